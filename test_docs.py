"""The documents cannot drift from the code: every table marked `<!-- check:NAME -->` in
vit_architecture.md, README.md and docs/*.md is recomputed from the code and compared cell by
cell."""

from __future__ import annotations

import ast
import math
import re
from pathlib import Path

import pytest
import torch

from vit_model import Attention, estimate_flops, vit_base, vit_cifar, vit_huge, vit_large

HERE = Path(__file__).resolve().parent
DOCS = [HERE / "vit_architecture.md", HERE / "README.md", *sorted((HERE / "docs").glob("*.md"))]


def checked_tables(name: str) -> list[list[list[str]]]:
    """Every markdown table that follows a `<!-- check:name -->` marker, in both documents."""
    tables = []
    for doc in DOCS:
        lines = doc.read_text(encoding="utf-8").splitlines()
        for i, line in enumerate(lines):
            if line.strip() == f"<!-- check:{name} -->":
                rows = []
                for row in lines[i + 1:]:
                    if not row.startswith("|"):
                        break
                    cells = [c.strip() for c in row.strip().strip("|").split("|")]
                    if not set("".join(cells)) <= set("-: "):
                        rows.append(cells)
                tables.append(rows[1:])  # drop the header
    return tables


def number(cell: str) -> float:
    return float(cell.replace(",", ""))


def model_by_name(name: str, img: int):
    if name.startswith("vit_cifar"):
        return vit_cifar(name)
    family, patch = re.fullmatch(r"ViT-([BLH])/(\d+)", name).groups()
    factory = {"B": vit_base, "L": vit_large, "H": vit_huge}[family]
    return factory(patch_size=int(patch), img_size=img)


def test_every_marked_table_is_found():
    assert len(checked_tables("shapes")) >= 1
    assert len(checked_tables("params")) >= 2  # architecture guide and README
    assert len(checked_tables("flops")) >= 1
    assert len(checked_tables("b16-breakdown")) >= 1


def test_shape_table_matches_a_real_forward_pass(shape_trace):
    with torch.device("meta"):  # shapes only, no memory
        traces = [shape_trace(vit_base(), torch.empty(2, 3, 224, 224)),
                  shape_trace(vit_cifar("vit_cifar_tiny"), torch.empty(2, 3, 32, 32))]
    for table in checked_tables("shapes"):
        keys = set()
        for row in table:
            key = row[1].strip("`")
            keys.add(key)
            for cell, trace in zip(row[2:4], traces, strict=True):
                documented = tuple(int(v) for v in cell.replace("B", "2").strip("()").split(","))
                actual = [s for k, _, s in trace
                          if (k.startswith("blocks.") if key == "blocks.*" else k == key)]
                assert actual and all(s == documented for s in actual), (key, cell, actual)
        assert keys >= {"input", "patch_embed.proj", "patch_embed", "z0",
                        "blocks.*", "norm", "pool", "head"}


def test_parameter_tables_match_the_code(parameter_table):
    rows = {name: (cfg, n) for name, cfg, n in parameter_table()}
    for table in checked_tables("params"):
        assert {r[0] for r in table} == set(rows)
        for name, img, patch, depth, dim, mlp, heads, tokens, count in table:
            cfg, n = rows[name]
            assert [int(img), int(patch), int(depth), int(dim), int(mlp), int(heads),
                    int(tokens)] == [cfg.img_size, cfg.patch_size, cfg.depth, cfg.embed_dim,
                                     int(cfg.embed_dim * cfg.mlp_ratio), cfg.num_heads,
                                     cfg.num_tokens], name
            assert number(count) == n, name


def test_b16_parameter_breakdown_matches_the_code():
    with torch.device("meta"):
        model = vit_base()
    counts = {"total": sum(p.numel() for p in model.parameters())}
    for name, p in model.named_parameters():
        part = name.split(".")[0]
        counts[part] = counts.get(part, 0) + p.numel()
    for table in checked_tables("b16-breakdown"):
        assert {r[0].strip("`") for r in table} == set(counts)
        for part, formula, count in table:
            assert number(count) == counts[part.strip("`")], part
            if formula:  # the written formula evaluates to the same number
                assert (eval(formula.replace("·", "*").replace("²", "**2"))
                        == counts[part.strip("`")])


@pytest.mark.parametrize("table_index", [0])
def test_flops_table_matches_the_formula(table_index):
    table = checked_tables("flops")[table_index]
    for name, img, patch, tokens, linear, attention, total in table:
        with torch.device("meta"):
            model = model_by_name(name, int(img))
        cfg = model.config
        f = estimate_flops(cfg)
        assert (cfg.patch_size, cfg.num_tokens) == (int(patch), int(tokens)), name
        assert number(linear) == round(f["blocks_linear"] / 1e9, 3), name
        assert number(attention) == round(f["blocks_attention"] / 1e9, 3), name
        assert number(total) == round(f["total"] / 1e9, 3), name


def _matrices(cell: str) -> torch.Tensor:
    return torch.tensor(ast.literal_eval(cell), dtype=torch.float32)


def test_worked_attention_example_is_what_the_code_computes():
    (table,) = checked_tables("worked-example")
    doc = {re.search(r"`(\w+)`", row[0]).group(1):
           torch.stack([_matrices(row[1]), _matrices(row[2])])
           for row in table}
    attn = Attention(4, num_heads=2)
    with torch.no_grad():
        attn.qkv.weight.copy_(torch.cat([torch.eye(4), torch.eye(4),
                                         torch.diag(torch.tensor([1.0, 2, 3, 4]))]))
        attn.qkv.bias.zero_()
        attn.proj.weight.copy_(torch.eye(4))
        attn.proj.bias.zero_()
        z = torch.tensor([[[1.0, 0, 1, 0], [0, 1, 0, 1], [1, 1, 0, 0]]])  # (1, T=3, D=4)
        out, A = attn(z, return_attention=True)
        # 3 x (heads, T, D_h)
        q, k, v = attn.qkv(z).reshape(1, 3, 3, 2, 2).permute(2, 0, 3, 1, 4)[:, 0]
    got = {"q": q, "k": k, "v": v, "scores": q @ k.transpose(-2, -1) / math.sqrt(2),
           "A": A[0], "SA": A[0] @ v}
    assert set(doc) == set(got)
    for name, value in got.items():
        torch.testing.assert_close(doc[name], value, atol=6e-5, rtol=0, msg=name)
    concat = torch.cat([doc["SA"][0], doc["SA"][1]], dim=-1)  # (T, D): the two heads side by side
    torch.testing.assert_close(concat, out[0], atol=6e-5, rtol=0)


def test_uniform_attention_distances_match_the_code():
    from visualize_attention import uniform_attention_distance

    (table,) = checked_tables("uniform-distance")
    for name, img, patch, grid, pixels in table:
        g, P = int(grid.split("×")[0]), int(patch)
        assert g * P == int(img), name
        assert number(pixels) == round(uniform_attention_distance(g, P), 1), name


def test_stated_ratios_and_differences():
    # vit_architecture.md section 9: attention / linear FLOPs per block = T / (6D),
    # e.g. 577 / 4608 for B/16 at 384
    for model in (vit_base(img_size=384), vit_base(), vit_cifar("vit_cifar_base")):
        cfg = model.config
        f = estimate_flops(cfg)
        assert f["blocks_attention"] / f["blocks_linear"] == pytest.approx(
            cfg.num_tokens / (6 * cfg.embed_dim))
    # section 4.2: the erf and tanh forms of GELU differ by at most 4.7e-4, at x = -2.7
    x = torch.linspace(-6, 6, 12001, dtype=torch.float64)
    diff = (torch.nn.functional.gelu(x) - torch.nn.functional.gelu(x, approximate="tanh")).abs()
    assert round(diff.max().item(), 5) == 0.00047 and round(x[diff.argmax()].item(), 1) == -2.7


def test_the_307m_paragraph_counts():
    text = DOCS[0].read_text(encoding="utf-8")
    with torch.device("meta"):
        stated = {304_326_632: vit_large(), 303_301_632: vit_large(num_classes=0),
                  306_535_400: vit_large(patch_size=32), 88_224_232: vit_base(patch_size=32)}
        for count, model in stated.items():
            assert f"{count:,}" in text
            assert sum(p.numel() for p in model.parameters()) == count


def test_study_tables_in_the_docs_are_the_measured_ones():
    """Each study table in README.md and docs/*.md (after `<!-- check:study-NAME -->`) is the
    one compare_configs.py writes from results/NAME.json, row for row, so the guide cannot show
    numbers no run produced."""
    import compare_configs as cc
    pages = [HERE / "README.md", *sorted((HERE / "docs").glob("*.md"))]
    found = [(page, name) for page in pages for name in
             re.findall(r"<!-- check:study-(\w+) -->", page.read_text(encoding="utf-8"))]
    assert found, "the guide shows no study table"
    for page, name in found:
        res = cc.Results(HERE / "results", name)
        assert res.rows, f"{page.name} shows study {name!r} but results/{name}.json has no rows"
        study = cc.STUDIES[name.removesuffix("_epochs")]
        expected = [line for line in cc.table(study, res).splitlines() if line.startswith("|")]
        after = page.read_text(encoding="utf-8").split(f"<!-- check:study-{name} -->", 1)[1]
        shown = after.lstrip("\n").splitlines()[:len(expected)]
        assert shown == expected, (page.name, name)


def test_relative_links_in_the_docs_point_at_files_that_exist():
    for page in [HERE / "README.md", HERE / "vit_architecture.md",
                 *sorted((HERE / "docs").glob("*.md"))]:
        text = page.read_text(encoding="utf-8")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://", "#")):
                continue
            path = (page.parent / target.split("#")[0]).resolve()
            assert path.exists(), f"{page.name} links to {target}, which does not exist"


# --------------------------------------------------------------------------------------------
# Every percentage and speed in the documents comes from a results file, the shipped model's
# card, or one line of docs/measurements.csv with the command that measured it
# --------------------------------------------------------------------------------------------

PAGES = [HERE / "README.md", HERE / "vit_architecture.md", *sorted((HERE / "docs").glob("*.md"))]
REGISTRY = HERE / "docs" / "measurements.csv"
_NUM = r"[+\-−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_UNIT = r"%|个百分点|张/秒|img/s|×(?!\d)"
_SEP = r"\s*(?:-|–|、|/|到|至|或|和|与|,(?!\d)|，)\s*"  # not the comma of 81,501
# A number with a unit, and the numbers listed before it that share the unit ("400、634、935
# 张/秒", "81.40-82.05%", "82,579 / 81,501 张/秒").
_STATED = re.compile(rf"((?:{_NUM}{_SEP})*)({_NUM})\s*({_UNIT})")


def stated_numbers(text: str) -> list[tuple[str, str, int]]:
    """(number as written, unit, line) of every percentage, percentage-point difference and
    speed in a markdown text."""
    found = []
    for m in _STATED.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        for s in [*re.findall(_NUM, m.group(1)), m.group(2)]:
            found.append((s, m.group(3), line))
    return found


def as_float(s: str) -> float:
    return float(s.replace(",", "").replace("−", "-"))


def decimals(s: str) -> int:
    return len(s.split(".")[1]) if "." in s else 0


def agrees(stated: str, values: set[float]) -> bool:
    """The stated number is one of the values, rounded as written (signs aside: a difference
    is stated as +x or -x)."""
    x, d = abs(as_float(stated)), decimals(stated)
    return any(abs(round(abs(v), d) - x) < 1e-9 for v in values)


def registry_rows() -> list[dict[str, str]]:
    import csv
    with REGISTRY.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def measured_values() -> set[float]:
    """Every number the results files and the card hold that a document may quote: accuracies,
    speeds and shares of each study row and of each epoch of its curve, every number of each
    study's rendered table (its differences and noise), and the shipped model's accuracies and
    predictions."""
    import json

    import compare_configs as cc
    values: set[float] = set()
    for path in sorted((HERE / "results").rglob("*.json")):
        rows = json.loads(path.read_text(encoding="utf-8"))["rows"]
        for r in rows:
            values.update(r[k] for k in ("val_acc", "test_acc", "images_per_sec") if k in r)
            for k, v in r.get("phases", {}).items():
                values.add(100 * v if k.endswith("share") else v)
            ref = r.get("machine", {}).get("ref_img_s")
            values.update([ref] if ref else [])
            for h in r.get("curve", []):  # each epoch: accuracies and the train/validation gap
                values.update(100 * h[k] for k in ("train_acc", "eval_acc", "train_eval_acc")
                              if k in h)
                if "train_eval_acc" in h and "eval_acc" in h:
                    values.add(100 * (h["train_eval_acc"] - h["eval_acc"]))
        study = cc.STUDIES.get(path.stem.removesuffix("_epochs"))
        if path.parent.name == "results" and study:
            text = cc.table(study, cc.Results(path.parent, path.stem))
            # its measured numbers: decimals and numbers with a unit (not seeds, times, counts)
            values.update(abs(as_float(s)) for s in re.findall(
                rf"{_NUM}(?=\s*(?:%|img/s|个百分点))|[+\-]?\d+\.\d+", text))
    for card in (HERE / "checkpoints").glob("*.json"):
        data = json.loads(card.read_text(encoding="utf-8"))
        values.update(data["test_accuracy"].values())
        values.update(100 * p for s in data["samples"] for _, p in s["top3"])
    return values


def registered_values() -> set[float]:
    return {as_float(v) for row in registry_rows() for v in row["values"].split()}


def test_every_percentage_and_speed_in_the_docs_has_a_source():
    sources = measured_values() | registered_values()
    loose = [f"{page.name}:{line}: {s}{unit}" for page in PAGES
             for s, unit, line in stated_numbers(page.read_text(encoding="utf-8"))
             if not agrees(s, sources)]
    assert not loose, ("numbers with no results file, card or docs/measurements.csv line "
                       "behind them:\n" + "\n".join(loose))


def test_the_number_check_catches_an_unlisted_number():
    text = "在 2 核 CPU 上 1,234.5 张/秒，准确率 12.34%，高 0.77 个百分点；400、634、935 张/秒"
    stated = stated_numbers(text)
    assert [s for s, _, _ in stated] == ["1,234.5", "12.34", "0.77", "400", "634", "935"]
    assert not agrees("12.34", {12.3, 12.35, 1.234})
    assert agrees("12.3", {12.34}) and agrees("-0.77", {0.77}) and agrees("1,234.5", {1234.5})


def test_each_registry_line_has_a_source_and_is_quoted():
    """docs/measurements.csv: every line says what was measured and how (the command; or the
    place in the paper, the setting, or the formula it comes from), and every number on it
    appears in a document."""
    quoted = {as_float(s) for page in PAGES
              for s, _, _ in stated_numbers(page.read_text(encoding="utf-8"))}
    quoted |= {abs(v) for v in quoted}
    for row in registry_rows():
        assert row["what"].strip() and row["source"].strip(), row
        assert row["source"].startswith(("python ", "论文", "设置", "计算")), row
        unused = [v for v in row["values"].split() if abs(as_float(v)) not in quoted]
        assert not unused, (f"docs/measurements.csv lists {unused} ({row['what']}), which no "
                            "document quotes")
