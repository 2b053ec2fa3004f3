"""Check a hand-written ViT against vit_model.py, module by module:

    python check_exercise.py                  # exercise_vit.py, the skeleton to fill in
    python check_exercise.py my_vit.py        # any file defining the five classes
    python check_exercise.py vit_model.py     # the reference itself: everything passes

For PatchEmbed, Attention, MLP, Block and VisionTransformer in turn, the reference's weights are
copied into the student's module (same attribute names), both get the same random input, and the
outputs must agree to 1e-5. The first module that fails stops the check, with what differs (shape,
NaN/inf, values or dtype) and, when the output matches a known mistake (computed here from the same
weights), a hint for it. The report is in Chinese, like the guide.

The student's file runs in a separate process (this checker never imports it), with a time limit
for the import and for each module (--timeout) and a memory limit (--memory-gb): an exception, an
exit (sys.exit, os._exit), an endless loop or a runaway allocation there is reported as a failure,
and only this process prints the summary. The process runs in a session of its own, ended as a
whole at the end of the check: no process the student's code starts outlives it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import multiprocessing as mp
import os
import resource
import signal
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import vit_model as ref

TOL = 1e-5
TIMEOUT = 60.0  # seconds for the import and for each module; --timeout changes it
MEMORY_GB = 8.0  # the worker's address space (torch alone takes about 3 GiB); --memory-gb
STARTUP = 120.0  # seconds to start the worker process and import torch there, not the student's
NAMES = ("PatchEmbed", "Attention", "MLP", "Block", "VisionTransformer")
# The small model every check uses: 8x8 images, 4x4 patches (N = 4), D = 8, 2 heads, M = 16.
IMG, PATCH, CH, DIM, HEADS, RATIO, DEPTH, CLASSES, BATCH = 8, 4, 3, 8, 2, 2.0, 2, 5, 2


@dataclass
class Result:
    name: str
    ok: bool
    message: str
    hint: str = ""
    # keys of the known mistakes the output matches
    mistakes: list[str] = field(default_factory=list)


def load_module(path: str | Path) -> ModuleType:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"找不到文件 {path}")
    sys.path.insert(0, str(path.resolve().parent))  # its neighbours import, as in `python file.py`
    spec = importlib.util.spec_from_file_location(f"student_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look their module up there
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[spec.name]
        raise
    return module


# --------------------------------------------------------------------------------------------
# Known mistakes: each is the module's output computed the wrong way, from the reference weights
# --------------------------------------------------------------------------------------------

def _attention(m: nn.Module, x: Tensor, scale: float | None = None, softmax_dim: int = -1,
               split_heads: bool = True, merge_heads: bool = True) -> Tensor:
    B, T, D = x.shape
    h, dh = m.num_heads, D // m.num_heads
    q, k, v = m.qkv(x).chunk(3, dim=-1)  # 3 x (B, T, D)
    if split_heads:
        q, k, v = (t.reshape(B, T, h, dh).transpose(1, 2) for t in (q, k, v))  # (B, h, T, D_h)
    else:
        q, k, v = (t.reshape(B, h, T, dh) for t in (q, k, v))  # heads cut across tokens
    a = (q @ k.transpose(-2, -1) * (dh**-0.5 if scale is None else scale)).softmax(softmax_dim)
    o = a @ v  # (B, h, T, D_h)
    o = o.transpose(1, 2).reshape(B, T, D) if merge_heads else o.reshape(B, T, D)
    return m.proj(o)


def _block(m: nn.Module, x: Tensor, form: str) -> Tensor:
    attn = lambda z: m.attn(z)[0]  # noqa: E731
    if form == "post_norm":
        x = m.norm1(x + attn(x))
        return m.norm2(x + m.mlp(x))
    if form == "no_attn_residual":
        x = attn(m.norm1(x))
        return x + m.mlp(m.norm2(x))
    if form == "no_mlp_residual":
        x = x + attn(m.norm1(x))
        return m.mlp(m.norm2(x))
    if form == "no_norm":
        x = x + attn(x)
        return x + m.mlp(x)
    raise ValueError(form)


def _vit(m: nn.Module, x: Tensor, form: str) -> Tensor:
    z = m.patch_embed(x)  # (B, N, D)
    cls = m.cls_token.expand(len(z), -1, -1)
    if form in ("no_cls", "no_cls_mean"):
        z = z + m.pos_embed[:, 1:]
    elif form == "no_pos":
        z = torch.cat([cls, z], dim=1)
    elif form == "cls_appended":
        z = torch.cat([z, cls], dim=1) + m.pos_embed
    else:
        z = torch.cat([cls, z], dim=1) + m.pos_embed
    for blk in m.blocks:
        z = blk(z)[0]
    if form == "no_final_norm":
        return m.head(z[:, 0])
    z = m.norm(z)
    pooled = (z.mean(1) if form in ("mean_tokens", "no_cls_mean")
              else z[:, -1] if form == "last_token" else z[:, 0])
    return m.head(pooled)


MISTAKES: dict[str, list[tuple[str, Callable[[nn.Module, Tensor], Tensor], str]]] = {
    "PatchEmbed": [
        ("no_transpose", lambda m, x: m.proj(x).flatten(2),
         "输出是 (B, D, N)：flatten(2) 之后还要 transpose(1, 2)，每个 patch 一行"),
        ("column_major", lambda m, x: m.proj(x).transpose(2, 3).flatten(2).transpose(1, 2),
         "patch 的顺序按列排了：论文和参考实现按行优先（先第 0 行从左到右，再第 1 行），"
         "不要交换 H、W"),
    ],
    "Attention": [
        ("no_scale", lambda m, x: _attention(m, x, scale=1.0),
         "打分没有除以 √D_h（公式 6：softmax(q kᵀ / √D_h)）"),
        ("scale_sqrt_d", lambda m, x: _attention(m, x, scale=x.shape[-1] ** -0.5),
         "除的是 √D，应当除以每个头的维度的平方根 √D_h = √(D / k)"),
        ("scale_times", lambda m, x: _attention(m, x, scale=(x.shape[-1] // m.num_heads) ** 0.5),
         "打分乘了 √D_h，应当是除以 √D_h"),
        ("softmax_axis", lambda m, x: _attention(m, x, softmax_dim=-2),
         "softmax 的维度不对：要对最后一维（key）归一化，使注意力矩阵每一行加起来为 1"),
        ("split_heads", lambda m, x: _attention(m, x, split_heads=False),
         "拆头的方式不对：(B, T, D) 要先 reshape 成 (B, T, k, D_h) 再 transpose(1, 2)，"
         "直接 reshape 成 (B, k, T, D_h) 会把不同 token 的数混进一个头"),
        ("merge_heads", lambda m, x: _attention(m, x, merge_heads=False),
         "合并各头的方式不对：(B, k, T, D_h) 要先 transpose(1, 2) 成 (B, T, k, D_h) "
         "再 reshape 成 (B, T, D)"),
        ("split_and_merge", lambda m, x: _attention(m, x, split_heads=False, merge_heads=False),
         "拆头与合并都少了 transpose：reshape 只改变形状，不会把 token 维和头维交换"),
    ],
    "MLP": [
        ("relu", lambda m, x: m.fc2(F.relu(m.fc1(x))),
         "激活函数用了 ReLU，论文用 GELU（第 3.1 节）"),
        ("gelu_tanh", lambda m, x: m.fc2(F.gelu(m.fc1(x), approximate="tanh")),
         "用了 tanh 近似的 GELU；参考实现（与 torchvision、timm 相同）是精确的 erf 形式 nn.GELU()"),
        ("no_activation", lambda m, x: m.fc2(m.fc1(x)),
         "两个线性层之间少了 GELU：没有激活函数，两层合起来只是一个线性变换"),
    ],
    "Block": [
        ("post_norm", lambda m, x: _block(m, x, "post_norm"),
         "用了 post-norm（原始 Transformer 的 LN(z + Sublayer(z))）；"
         "ViT 是 pre-norm：z' = MSA(LN(z)) + z（公式 2-3）"),
        ("no_attn_residual", lambda m, x: _block(m, x, "no_attn_residual"),
         "注意力那一支少了残差连接：公式 2 是 z' = MSA(LN(z)) + z"),
        ("no_mlp_residual", lambda m, x: _block(m, x, "no_mlp_residual"),
         "MLP 那一支少了残差连接：公式 3 是 z = MLP(LN(z')) + z'"),
        ("no_norm", lambda m, x: _block(m, x, "no_norm"),
         "两个子层之前都没有 LayerNorm（norm1、norm2）"),
    ],
    "VisionTransformer": [
        ("no_cls", lambda m, x: _vit(m, x, "no_cls"),
         "没有在序列前面拼接 [CLS] token（公式 1 的 x_class），"
         "分类用的第 0 个 token 其实是第一个 patch"),
        ("no_cls_mean", lambda m, x: _vit(m, x, "no_cls_mean"),
         "没有在序列前面拼接 [CLS] token（公式 1 的 x_class），而是对 patch 取平均；"
         "这个练习要 [CLS] 的输出 z_L^0"),
        ("cls_appended", lambda m, x: _vit(m, x, "cls_appended"),
         "[CLS] 拼在了序列末尾：它应当是第 0 个 token，位置编码的第 0 行属于它"),
        ("no_pos", lambda m, x: _vit(m, x, "no_pos"), "没有加位置编码 E_pos（公式 1）"),
        ("last_token", lambda m, x: _vit(m, x, "last_token"),
         "分类用了最后一个 token；应当用 [CLS] 的输出 z_L^0（公式 4）"),
        ("mean_tokens", lambda m, x: _vit(m, x, "mean_tokens"),
         "分类用了所有 token 的平均（那是 GAP，附录 D.3）；"
         "这个练习用 [CLS] 的输出 z_L^0（公式 4）"),
        ("no_final_norm", lambda m, x: _vit(m, x, "no_final_norm"),
         "分类头之前少了最后的 LayerNorm（公式 4：y = LN(z_L^0)）"),
    ],
}

GENERAL_HINTS = {
    "PatchEmbed": "检查卷积的 kernel_size 和 stride 是否都等于 patch_size，"
                  "以及 flatten(2).transpose(1, 2)。",
    "Attention": "检查 qkv 的切分（[q | k | v]，各 D 列）、缩放 1/√D_h、softmax 的维度、"
                 "拆头和合并头时的 transpose、输出投影 proj。",
    "MLP": "检查 fc1 → GELU → fc2 的顺序。",
    "Block": "检查 pre-norm 的顺序（norm1 → attn → 加残差，norm2 → mlp → 加残差），"
             "以及 LayerNorm 的 eps=1e-6。",
    "VisionTransformer": "检查 [CLS] 的拼接位置、位置编码的加法、"
                         "每个 Block、最后的 norm 和取第 0 个 token。",
}


NON_FINITE_HINT = ("NaN/inf 通常来自除以 0、对负数开方、log(0) 或数值溢出；"
                   "检查缩放和 softmax 的写法")
DTYPE_HINT = ("输入和权重都是 float32；不要用 .double()、numpy、dtype=... "
              "或 torch.set_default_dtype 改变参数或输出的类型")
EXIT_HINT = ("你的代码在检查器的子进程里运行：不要调用 sys.exit()、exit() 或 os._exit()"
             "（演示代码放进 if __name__ == \"__main__\": 里）")
TIMEOUT_HINT = "检查循环能否结束：这里的模型很小，每个模块都应当在一秒内算完"
MEMORY_HINT = ("内存超过了检查器的上限（--memory-gb）：这里的模型很小，"
               "检查是否创建了过大的张量或列表")


# --------------------------------------------------------------------------------------------
# The checks (run in the worker process, see check() below)
# --------------------------------------------------------------------------------------------

def _build(name: str, cls: type) -> nn.Module:
    if name == "PatchEmbed":
        return cls(IMG, PATCH, CH, DIM)
    if name == "Attention":
        return cls(DIM, HEADS)
    if name == "MLP":
        return cls(DIM, int(DIM * RATIO))
    if name == "Block":
        return cls(DIM, HEADS, RATIO)
    return cls(img_size=IMG, patch_size=PATCH, in_chans=CH, num_classes=CLASSES, embed_dim=DIM,
               depth=DEPTH, num_heads=HEADS, mlp_ratio=RATIO)


def _input(name: str) -> Tensor:
    g = torch.Generator().manual_seed(1)
    if name in ("PatchEmbed", "VisionTransformer"):
        return torch.randn(BATCH, CH, IMG, IMG, generator=g)
    return torch.randn(BATCH, (IMG // PATCH) ** 2 + 1, DIM, generator=g)


def _output(module: nn.Module, x: Tensor) -> Tensor:
    out = module(x)
    return out[0] if isinstance(out, tuple) else out  # the reference also returns attention weights


def _where(exc: BaseException, path: Path) -> str:
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if Path(f.filename).resolve() == path.resolve()]
    return f"（{path.name} 第 {frames[-1].lineno} 行）" if frames else ""


def _what(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"调用了 sys.exit() 或 exit()（SystemExit: {exc.code}）"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _hint(exc: BaseException) -> str:
    return (EXIT_HINT if isinstance(exc, SystemExit)
            else MEMORY_HINT if isinstance(exc, MemoryError) else "")


def make_reference(name: str) -> tuple[nn.Module, Tensor, Tensor]:
    """The reference module, with random non-zero weights (so that no mistake hides behind a zero),
    its input and its output."""
    torch.manual_seed(0)
    module = _build(name, getattr(ref, name)).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.5)
        x = _input(name)
        return module, x, _output(module, x)


def check_one(name: str, student: ModuleType, path: Path,
              made: tuple[nn.Module, Tensor, Tensor]) -> Result:
    """`made`: make_reference(name), called before the student's code ran (see _worker)."""
    cls = getattr(student, name, None)
    if not isinstance(cls, type) or not issubclass(cls, nn.Module):
        return Result(name, False, f"{path.name} 里没有 nn.Module 子类 {name}")
    reference, x, expected = made
    try:
        mine = _build(name, cls).eval()
    except NotImplementedError:
        return Result(name, False, "还没有实现（__init__ 里是 raise NotImplementedError）")
    except BaseException as e:  # SystemExit and KeyboardInterrupt too
        return Result(name, False, f"构造 {name} 时出错{_where(e, path)}：{_what(e)}", _hint(e))
    theirs, ours = mine.state_dict(), reference.state_dict()
    missing, extra = sorted(ours.keys() - theirs.keys()), sorted(theirs.keys() - ours.keys())
    shapes = [f"{k}: 应为 {tuple(ours[k].shape)}，实际 {tuple(theirs[k].shape)}"
              for k in sorted(ours.keys() & theirs.keys()) if ours[k].shape != theirs[k].shape]
    if missing or extra or shapes:
        parts = (([f"缺少参数 {missing}"] if missing else [])
                 + ([f"多出参数 {extra}"] if extra else []) + shapes)
        return Result(name, False, "参数名或形状与参考实现不同：" + "；".join(parts),
                      "属性名要与 exercise_vit.py 的说明一致（proj、qkv、fc1、fc2、norm1、attn、"
                      "norm2、mlp、patch_embed、cls_token、pos_embed、blocks、norm、head）")
    if wrong := [k for k in ours if theirs[k].dtype != ours[k].dtype]:
        return Result(name, False, f"参数的 dtype 不对：{wrong[0]} 是 {theirs[wrong[0]].dtype}，"
                                   f"应为 {ours[wrong[0]].dtype}", DTYPE_HINT)
    mine.load_state_dict(ours)
    with torch.no_grad():
        try:
            got = _output(mine, x.clone())
        except NotImplementedError:
            return Result(name, False, "还没有实现（forward 里是 raise NotImplementedError）")
        except BaseException as e:
            return Result(name, False, f"前向计算出错{_where(e, path)}：{_what(e)}", _hint(e))
        if not isinstance(got, Tensor):
            return Result(name, False, f"forward 应返回张量，实际返回 {type(got).__name__}")
        matched = [(key, hint) for key, fn, hint in MISTAKES[name]
                   if (w := fn(reference, x)).shape == got.shape
                   and torch.allclose(w.double(), got.double(), atol=1e-4, rtol=1e-4)]
    if got.shape != expected.shape:
        return Result(name, False, f"输出形状不对：应为 {tuple(expected.shape)}，"
                                   f"实际 {tuple(got.shape)}",
                      matched[0][1] if matched else GENERAL_HINTS[name], [k for k, _ in matched])
    if not (finite := torch.isfinite(got)).all():  # NaN > TOL is False: never compare those
        return Result(name, False, f"输出里有 NaN 或 inf：{(~finite).sum().item()} 个"
                                   f"（共 {got.numel()} 个数）", NON_FINITE_HINT)
    err = (got.double() - expected.double()).abs().max().item()
    dtype = f"；输出的 dtype 是 {got.dtype}，应为 {expected.dtype}"
    if err > TOL:
        return Result(name, False, f"输出数值不对：形状正确 {tuple(got.shape)}，"
                                   f"与参考实现的最大差 {err:.3g}（允许 {TOL:g}）"
                                   + (dtype if got.dtype != expected.dtype else ""),
                      matched[0][1] if matched else GENERAL_HINTS[name], [k for k, _ in matched])
    if got.dtype != expected.dtype:
        return Result(name, False, "数值正确" + dtype, DTYPE_HINT)
    return Result(name, True, f"通过（形状 {tuple(got.shape)}，最大差 {err:.1e}）")


def _worker(path: Path, conn: Connection, memory_gb: float) -> None:
    """In the worker process: send each step's name as it starts ("import", then the modules),
    then its Result (as a dict); stop at the first that fails. Not cheat-proof: code that sends
    results of its own or patches vit_model here fools only its author."""
    def send(message: str | Result) -> None:
        conn.send(message if isinstance(message, str) else vars(message))

    os.setsid()  # a process group of its own, ended as a whole by check()
    with contextlib.suppress(ValueError, OSError):  # a lower limit set before stays
        limit = int(memory_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))  # beyond it, MemoryError
    for stream in (sys.stdout, sys.stderr):  # the student's prints show even if the worker dies
        stream.reconfigure(line_buffering=True)
    # before the student's code runs: its global torch state (set_default_dtype, a default device)
    # cannot reach the reference
    references = {name: make_reference(name) for name in NAMES}
    send("import")
    try:
        student = load_module(path)
    except NotImplementedError:
        return send(Result("import", False, f"导入 {path.name} 时就遇到了 NotImplementedError："
                                            "不要在模块顶层调用未实现的代码"))
    except BaseException as e:  # SystemExit and KeyboardInterrupt too
        return send(Result("import", False, f"无法导入 {path}：{_what(e)}", _hint(e)))
    for name in NAMES:
        send(name)
        try:
            result = check_one(name, student, path, references[name])
        except BaseException as e:  # anything the student's code broke on the way
            result = Result(name, False, f"检查 {name} 时出错：{_what(e)}")
        send(result)
        if not result.ok:
            return


# forkserver (Linux): each worker is forked from a process that has torch loaded already, so it
# starts in a fraction of a second; elsewhere a fresh Python (spawn), a few seconds.
if sys.platform == "linux":
    CONTEXT = mp.get_context("forkserver")
    CONTEXT.set_forkserver_preload(["vit_model"])
else:
    CONTEXT = mp.get_context("spawn")


def check(path: str | Path, timeout: float = TIMEOUT, memory_gb: float = MEMORY_GB
          ) -> list[Result]:
    """Check the five modules in order, in a worker process that may use `memory_gb` GiB of address
    space; stop at the first that fails, that takes longer than `timeout` seconds, or ends the
    process."""
    path = Path(path)
    receiver, sender = CONTEXT.Pipe(duplex=False)
    worker = CONTEXT.Process(target=_worker, args=(path, sender, memory_gb))
    worker.start()
    sender.close()  # the worker holds the only sending end now: recv() fails once it is gone
    results, step, limit = [], "import", max(timeout, STARTUP)
    try:
        while True:
            what = f"导入 {path.name}" if step == "import" else f"检查 {step}"
            if not receiver.poll(limit):
                results.append(Result(step, False, f"{what} 超过 {timeout:g} 秒还没有完成，"
                                                   "已停止（死循环？）", TIMEOUT_HINT))
                break
            try:
                message = receiver.recv()
            except EOFError:
                worker.join(5)
                results.append(Result(step, False, f"{what} 时进程退出了"
                                                   f"（退出码 {worker.exitcode}），没有给出结果",
                                      EXIT_HINT + "；退出码为负数是被信号终止（崩溃或内存不足）"))
                break
            if isinstance(message, str):
                step, limit = message, timeout
            else:
                results.append(Result(**message))
                if not results[-1].ok or len(results) == len(NAMES):
                    break
    finally:  # end whatever it still does (threads, a loop) and every process it started
        with contextlib.suppress(ProcessLookupError):  # none left, or not yet in its own group
            os.killpg(worker.pid, signal.SIGKILL)
        worker.kill()
        worker.join()
        receiver.close()
    return results


def _main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", nargs="?", default="exercise_vit.py",
                   help="a Python file that defines PatchEmbed, Attention, MLP, Block and "
                        "VisionTransformer")
    p.add_argument("--timeout", type=float, default=TIMEOUT, metavar="SECONDS",
                   help=f"time limit for importing the file and for each module "
                        f"(default {TIMEOUT:g})")
    p.add_argument("--memory-gb", type=float, default=MEMORY_GB, metavar="GIB",
                   help=f"address space the file's code may use, torch included "
                        f"(default {MEMORY_GB:g})")
    args = p.parse_args(argv)
    if not 0 < args.timeout <= 86400:
        p.error("--timeout must be more than 0 and at most 86400 seconds (a day)")
    if not 4 <= args.memory_gb <= 2**20:
        p.error("--memory-gb must be at least 4 (torch alone takes about 3) and at most 2**20")
    if not Path(args.file).is_file():
        raise FileNotFoundError(f"no such file: {args.file}")
    results = check(args.file, args.timeout, args.memory_gb)
    for r in results:
        print(f"{'✓' if r.ok else '✗'} {r.name}：{r.message}")
        if r.hint:
            print(f"  提示：{r.hint}")
    passed = sum(r.ok for r in results)
    if passed == len(NAMES):
        print(f"全部 {len(NAMES)} 个模块都与参考实现一致。")
        return 0
    print(f"{passed}/{len(NAMES)} 个模块通过；改好上面这一个再运行一次。")
    return 1


def main(argv: list[str] | None = None) -> int:
    """The command line: a missing file is one line `error: ...` and exit code 2."""
    # imported here, not above: every worker imports this file, and runtime brings torchvision
    from runtime import run_cli
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
