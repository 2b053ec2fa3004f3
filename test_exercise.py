"""The exercise checker: the reference passes, the skeleton fails cleanly, and each common mistake,
written as a small mutated implementation, is caught at the right module with the right hint.
Hostile code (NaN, another dtype, exits, endless loops, KeyboardInterrupt, runaway memory) is a
reported failure: the student's file runs in a separate process with a time and a memory limit,
ended with every process it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import check_exercise as ce

HERE = Path(__file__).resolve().parent
HEADER = """\
import torch
import torch.nn.functional as F
from vit_model import MLP, Attention, Block, PatchEmbed, VisionTransformer
"""

ATTENTION = """\
class Attention(Attention):
    def forward(self, x, return_attention=False):
        B, T, D = x.shape
        h, dh = self.num_heads, D // self.num_heads
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k, v = ({split} for t in (q, k, v))
        a = (q @ k.transpose(-2, -1) {scale}).softmax({axis})
        o = a @ v
        return self.proj({merge})
"""
GOOD = dict(split="t.reshape(B, T, h, dh).transpose(1, 2)", scale="/ dh ** 0.5", axis="-1",
            merge="o.transpose(1, 2).reshape(B, T, D)")

BLOCK = """\
class Block(Block):
    def forward(self, x, return_attention=False):
        {body}
        return x
"""

VIT = """\
class VisionTransformer(VisionTransformer):
    def forward(self, x):
        z = self.patch_embed(x)
        cls = self.cls_token.expand(len(z), -1, -1)
        {embed}
        for blk in self.blocks:
            z = blk(z)[0]
        return self.head({pool})
"""

MUTANTS = {
    "no_transpose": ("PatchEmbed", """\
class PatchEmbed(PatchEmbed):
    def forward(self, x):
        return self.proj(x).flatten(2)
"""),
    "no_scale": ("Attention", ATTENTION.format(**{**GOOD, "scale": ""})),
    "scale_sqrt_d": ("Attention", ATTENTION.format(**{**GOOD, "scale": "/ D ** 0.5"})),
    "softmax_axis": ("Attention", ATTENTION.format(**{**GOOD, "axis": "-2"})),
    "split_heads": ("Attention", ATTENTION.format(**{**GOOD, "split": "t.reshape(B, h, T, dh)"})),
    "merge_heads": ("Attention", ATTENTION.format(**{**GOOD, "merge": "o.reshape(B, T, D)"})),
    "relu": ("MLP", """\
class MLP(MLP):
    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))
"""),
    "post_norm": ("Block", BLOCK.format(
        body="x = self.norm1(x + self.attn(x)[0]); x = self.norm2(x + self.mlp(x))")),
    "no_attn_residual": ("Block", BLOCK.format(
        body="x = self.attn(self.norm1(x))[0]; x = x + self.mlp(self.norm2(x))")),
    "no_mlp_residual": ("Block", BLOCK.format(
        body="x = x + self.attn(self.norm1(x))[0]; x = self.mlp(self.norm2(x))")),
    "no_cls": ("VisionTransformer", VIT.format(
        embed="z = z + self.pos_embed[:, 1:]", pool="self.norm(z)[:, 0]")),
    "no_pos": ("VisionTransformer", VIT.format(
        embed="z = torch.cat([cls, z], 1)", pool="self.norm(z)[:, 0]")),
    "last_token": ("VisionTransformer", VIT.format(
        embed="z = torch.cat([cls, z], 1) + self.pos_embed", pool="self.norm(z)[:, -1]")),
    "mean_tokens": ("VisionTransformer", VIT.format(
        embed="z = torch.cat([cls, z], 1) + self.pos_embed", pool="self.norm(z).mean(1)")),
}


def write(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / f"{name}.py"
    path.write_text(HEADER + "\n\n" + textwrap.dedent(body))
    return path


def test_the_reference_passes_every_module(capsys):
    results = ce.check(HERE / "vit_model.py")
    assert [r.name for r in results] == list(ce.NAMES) and all(r.ok for r in results)
    assert ce.main([str(HERE / "vit_model.py")]) == 0
    assert "全部 5 个模块都与参考实现一致" in capsys.readouterr().out


def test_the_skeleton_fails_cleanly(capsys):
    results = ce.check(HERE / "exercise_vit.py")
    assert len(results) == 1 and not results[0].ok and results[0].name == "PatchEmbed"
    assert "还没有实现" in results[0].message
    assert ce.main([str(HERE / "exercise_vit.py")]) == 1
    assert "0/5 个模块通过" in capsys.readouterr().out


def test_a_correct_rewrite_passes(tmp_path):
    """The attention written differently from the reference (chunk, not one reshape) is still
    right."""
    results = ce.check(write(tmp_path, "good", ATTENTION.format(**GOOD)))
    assert all(r.ok for r in results) and len(results) == 5


@pytest.mark.parametrize("mistake", sorted(MUTANTS))
def test_each_common_mistake_is_caught_with_its_hint(tmp_path, mistake):
    module, body = MUTANTS[mistake]
    results = ce.check(write(tmp_path, mistake, body))
    *passed, failed = results
    assert all(r.ok for r in passed) and failed.name == module and not failed.ok
    assert failed.mistakes == [mistake], (failed.message, failed.mistakes)
    hint = next(h for key, _, h in ce.MISTAKES[module] if key == mistake)
    assert failed.hint == hint


def test_errors_in_the_students_code_are_reported_not_raised(tmp_path):
    crash = write(tmp_path, "crash", """\
class Attention(Attention):
    def forward(self, x, return_attention=False):
        return x @ torch.ones(3, 3)
""")
    *_, failed = ce.check(crash)
    assert failed.name == "Attention" and "前向计算出错（crash.py 第" in failed.message
    assert "RuntimeError" in failed.message
    renamed = write(tmp_path, "renamed", """\
class MLP(torch.nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.linear1 = torch.nn.Linear(dim, hidden_dim)
        self.linear2 = torch.nn.Linear(hidden_dim, dim)
""")
    *_, failed = ce.check(renamed)
    assert failed.name == "MLP" and "缺少参数 ['fc1.bias', 'fc1.weight'" in failed.message
    assert ce.check(tmp_path / "missing.py")[0].message.startswith("无法导入")


# --------------------------------------------------------------------------------------------
# Hostile code: every way out of the student's file is a failure the parent reports
# --------------------------------------------------------------------------------------------

MLP_RETURNS = """\
class MLP(MLP):
    def forward(self, x):
        {body}
"""


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_non_finite_output_fails_with_a_hint(tmp_path, capsys, value):
    path = write(tmp_path, value, MLP_RETURNS.format(
        body=f"return super().forward(x) * float('{value}')"))
    *passed, failed = ce.check(path)
    assert all(r.ok for r in passed) and failed.name == "MLP" and not failed.ok
    assert "NaN 或 inf" in failed.message and failed.hint
    assert ce.main([str(path)]) == 1
    assert "全部 5 个模块" not in capsys.readouterr().out


def test_a_float64_output_is_a_failure_not_a_traceback(tmp_path):
    right = write(tmp_path, "double", MLP_RETURNS.format(body="return super().forward(x).double()"))
    *_, failed = ce.check(right)
    assert failed.name == "MLP" and not failed.ok and "torch.float64" in failed.message
    wrong = write(tmp_path, "relu_double", MLP_RETURNS.format(
        body="return self.fc2(F.relu(self.fc1(x))).double()"))
    *_, failed = ce.check(wrong)
    assert failed.name == "MLP" and failed.mistakes == ["relu"]  # the known mistake still found


@pytest.mark.parametrize("where, code, step, says", [
    ("module", "import sys\nsys.exit(0)", "import", "sys.exit"),
    ("module", "exit()", "import", "sys.exit"),
    ("module", "raise KeyboardInterrupt", "import", "KeyboardInterrupt"),
    ("forward", "import sys; sys.exit(0)", "MLP", "sys.exit"),
    ("forward", "raise KeyboardInterrupt", "MLP", "KeyboardInterrupt"),
], ids=["sys.exit", "exit()", "KeyboardInterrupt", "sys.exit-in-forward",
        "KeyboardInterrupt-in-forward"])
def test_exits_and_base_exceptions_are_reported_failures(tmp_path, where, code, step, says):
    body = (MLP_RETURNS.format(body=code) if where == "forward"
            else code + "\n\n\n" + MLP_RETURNS.format(body="return super().forward(x)"))
    *_, failed = ce.check(write(tmp_path, "leaves", body))
    assert failed.name == step and not failed.ok and says in failed.message, failed


@pytest.mark.slow
def test_an_endless_loop_times_out(tmp_path, capsys):
    in_forward = write(tmp_path, "loop", MLP_RETURNS.format(body="while True: pass"))
    assert ce.main([str(in_forward), "--timeout", "1.5"]) == 1
    out = capsys.readouterr().out
    assert "✗ MLP" in out and "1.5 秒" in out and "2/5 个模块通过" in out
    at_import = write(tmp_path, "loop_import", "while True:\n    pass\n")
    [failed] = ce.check(at_import, timeout=1.5)
    assert failed.name == "import" and "1.5 秒" in failed.message


def test_the_checker_never_imports_the_students_code(tmp_path):
    path = write(tmp_path, "meddles", "import vit_model\nvit_model.MEDDLED = True\n")
    ce.check(path)
    assert not any(m.startswith("student_") for m in sys.modules)
    assert not hasattr(ce.ref, "MEDDLED")


@pytest.mark.slow
@pytest.mark.parametrize("where, code, says", [
    ("module", "import os\nos._exit(0)", "✗ import"),
    ("forward", "import os; os._exit(0)", "✗ MLP"),
    ("module", "import sys\nsys.exit(0)", "✗ import"),
], ids=["os._exit", "os._exit-in-forward", "sys.exit"])
def test_an_exit_never_ends_the_checker_with_success(tmp_path, where, code, says):
    """Out of process: an os._exit in this one would end pytest itself, with status 0."""
    body = (MLP_RETURNS.format(body=code) if where == "forward"
            else code + "\n\n\n" + MLP_RETURNS.format(body="return super().forward(x)"))
    run = subprocess.run([sys.executable, str(HERE / "check_exercise.py"),
                          str(write(tmp_path, "leaves", body))],
                         cwd=HERE, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, (run.stdout, run.stderr)
    assert says in run.stdout and "exit" in run.stdout and "个模块通过" in run.stdout


def test_the_students_global_torch_state_never_reaches_the_reference(tmp_path):
    """set_default_dtype(float64) would otherwise build the reference in float64 too."""
    path = write(tmp_path, "double_default", "torch.set_default_dtype(torch.float64)\n")
    [failed] = ce.check(path)
    assert failed.name == "PatchEmbed" and not failed.ok and "torch.float64" in failed.message
    assert failed.hint == ce.DTYPE_HINT


def test_a_runaway_allocation_is_a_reported_memory_error(tmp_path):
    """bytes(n) only reserves the memory, so without the limit this harms nothing."""
    path = write(tmp_path, "greedy", "hog = bytes(12 << 30)\n")
    [failed] = ce.check(path, memory_gb=6)
    assert failed.name == "import" and "MemoryError" in failed.message
    assert failed.hint == ce.MEMORY_HINT


def _running(pid: int) -> bool:
    try:  # a zombie has ended, its parent just has not collected it yet
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in "ZX"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_processes_the_students_code_starts_end_with_the_check(tmp_path):
    pidfile = tmp_path / "pid"
    ce.check(write(tmp_path, "starts", f"""\
import subprocess
open({str(pidfile)!r}, "w").write(str(subprocess.Popen(["sleep", "60"]).pid))
"""))
    pid = int(pidfile.read_text())
    try:
        deadline = time.monotonic() + 5
        while _running(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _running(pid)
    finally:
        if _running(pid):
            os.kill(pid, signal.SIGKILL)


def test_the_students_file_may_import_its_neighbours(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "helper.py").write_text("from vit_model import MLP as X\n")
    path = write(tmp_path / "sub", "uses_helper", "from helper import X\n\nMLP = X\n")
    results = ce.check(path)
    assert len(results) == 5 and all(r.ok for r in results), results[-1]


def test_a_missing_file_is_one_error_line_and_exit_code_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        ce.main([str(tmp_path / "nope.py")])
    assert stop.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and "nope.py" in err
    assert len(err.splitlines()) == 1
