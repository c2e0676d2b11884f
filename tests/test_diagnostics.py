"""Tests for the vector diagnostics: norms and cosines, whole-model and per block group,
checked against an independent float64 computation, and their tables and figure."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dem_ray.core import diagnostics as core_diagnostics
from dem_ray.core.diagnostics import mean_offdiagonal, vector_diagnostics
from dem_ray.core.vectors import VectorError, save_tensors
from dem_ray.models.tiny import make_tiny_model, synthetic_corpus
from dem_ray.report.diagnostics import (
    diagnostics_markdown,
    fmt_cosine,
    fmt_norm,
    plot_similarity,
)

LAYERS = 4
NAMES = ["numbers", "letters", "code"]


@pytest.fixture(scope="module")
def base_state(tmp_path_factory) -> dict[str, torch.Tensor]:
    root = tmp_path_factory.mktemp("diag_base")
    texts = synthetic_corpus("numbers", 30, seed=2) + synthetic_corpus("letters", 30, seed=2)
    model = make_tiny_model(
        root / "base", texts, architecture="llama", tie_embeddings=True, layers=LAYERS
    )
    return load_file(str(model / "model.safetensors"))


@pytest.fixture(scope="module")
def vectors(base_state) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(7)
    shared = {n: torch.randn(t.shape, generator=gen) for n, t in sorted(base_state.items())}
    # partly shared directions, so the cosines are well away from 0 and from each other
    return [
        {n: (mix * shared[n] + torch.randn(s.shape, generator=gen)) * scale
         for n, s in shared.items()}
        for mix, scale in ((0.3, 0.01), (0.8, 0.03), (1.5, 0.002))
    ]  # fmt: skip


@pytest.fixture(scope="module")
def vector_files(tmp_path_factory, vectors) -> list[Path]:
    root = tmp_path_factory.mktemp("diag_vectors")
    paths = []
    for name, vec in zip(NAMES, vectors, strict=True):
        save_tensors(vec, root / f"{name}.safetensors")
        paths.append(root / f"{name}.safetensors")
    return paths


def write(tmp_path: Path, name: str, tensors: dict[str, torch.Tensor]) -> Path:
    path = tmp_path / f"{name}.safetensors"
    save_tensors(tensors, path)
    return path


# ---- an independent reference ----------------------------------------------------------------
def flat(vec: dict[str, torch.Tensor], names) -> torch.Tensor:
    return torch.cat([vec[n].double().reshape(-1) for n in sorted(names)])


def reference(vecs: list[dict[str, torch.Tensor]], names) -> tuple[list[float], list[list[float]]]:
    rows = [flat(v, names) for v in vecs]
    norms = [float(torch.linalg.vector_norm(r)) for r in rows]
    cos = [[float(a @ b) / (na * nb) for b, nb in zip(rows, norms, strict=True)]
           for a, na in zip(rows, norms, strict=True)]  # fmt: skip
    return norms, cos


def group_rule(name: str, layers_per_group: int) -> str:
    """Embeddings, `layers.<l>.` in block l // layers_per_group, everything else the head."""
    if "embed_tokens" in name:
        return "embed"
    match = re.search(r"\.layers\.(\d+)\.", name)
    if match:
        return f"block{int(match.group(1)) // layers_per_group}"
    return "head"


def assert_close(actual: float, expected: float, rel: float = 1e-9):
    assert actual == pytest.approx(expected, rel=rel, abs=1e-12)


# ---- the numbers --------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [core_diagnostics.CHUNK, 1000])
def test_norms_and_cosines_match_a_float64_reference(vector_files, vectors, monkeypatch, chunk):
    monkeypatch.setattr(core_diagnostics, "CHUNK", chunk)  # 1000: tensors cross chunks
    diag = vector_diagnostics(vector_files, NAMES)
    norms, cos = reference(vectors, vectors[0])
    assert diag["datasets"] == NAMES
    for i, name in enumerate(NAMES):
        assert_close(diag["norm"][name], norms[i])
        assert diag["cosine"][i][i] == 1.0
        for j in range(len(NAMES)):
            assert_close(diag["cosine"][i][j], cos[i][j])
            assert diag["cosine"][i][j] == diag["cosine"][j][i]
    off = [cos[i][j] for i in range(3) for j in range(3) if i != j]
    assert min(abs(c) for c in off) > 0.05  # the fixture's vectors really are correlated
    assert mean_offdiagonal(diag["cosine"]) == pytest.approx(sum(off) / len(off), rel=1e-9)


def test_per_group_results_match_the_reference_over_each_groups_tensors(vector_files, vectors):
    diag = vector_diagnostics(vector_files, NAMES, groups=2)
    assert diag["groups"] == ["embed", "block0", "block1", "head"]
    tensor_names = sorted(vectors[0])
    by_group = {g: [n for n in tensor_names if group_rule(n, LAYERS // 2) == g]
                for g in diag["groups"]}  # fmt: skip
    # the groups partition the tensors, and none is empty in this model
    assert sorted(n for names in by_group.values() for n in names) == tensor_names
    assert all(by_group.values())
    assert by_group["embed"] == ["model.embed_tokens.weight"]
    assert by_group["head"] == ["model.norm.weight"]
    for group, names in by_group.items():
        norms, cos = reference(vectors, names)
        count = sum(vectors[0][n].numel() for n in names)
        assert diag["parameters_by_group"][group] == count
        for i, name in enumerate(NAMES):
            assert_close(diag["norm_by_group"][group][name], norms[i])
            for j in range(len(NAMES)):
                assert_close(diag["cosine_by_group"][group][i][j], cos[i][j])
    assert sum(diag["parameters_by_group"].values()) == flat(vectors[0], tensor_names).numel()
    for name in NAMES:  # the groups' squared norms add up to the whole's
        squares = sum(diag["norm_by_group"][g][name] ** 2 for g in diag["groups"])
        assert_close(math.sqrt(squares), diag["norm"][name])


def test_groups_are_clamped_to_the_layer_count(vector_files):
    assert vector_diagnostics(vector_files, NAMES, groups=10)["groups"] == [
        "embed", "block0", "block1", "block2", "block3", "head"
    ]  # fmt: skip
    assert vector_diagnostics(vector_files, NAMES, groups=0)["groups"] == [
        "embed", "block0", "head"
    ]  # fmt: skip


def test_the_result_is_plain_json(vector_files):
    diag = vector_diagnostics(vector_files, NAMES)
    assert json.loads(json.dumps(diag, allow_nan=False)) == diag


def test_multiples_have_cosine_one_and_disjoint_supports_cosine_zero(tmp_path, vectors):
    v = vectors[0]
    names = sorted(v)
    layer_names = [n for n in names if ".layers." in n]
    only_embed = {n: t if "embed_tokens" in n else torch.zeros_like(t) for n, t in v.items()}
    only_layers = {n: t if n in layer_names else torch.zeros_like(t) for n, t in vectors[1].items()}
    paths = [
        write(tmp_path, "v", v),
        write(tmp_path, "v_times_4", {n: t * 4 for n, t in v.items()}),
        write(tmp_path, "minus_v", {n: -t for n, t in v.items()}),
        write(tmp_path, "only_embed", only_embed),
        write(tmp_path, "only_layers", only_layers),
        write(tmp_path, "zero", {n: torch.zeros_like(t) for n, t in v.items()}),
    ]
    labels = [p.stem for p in paths]
    diag = vector_diagnostics(paths, labels, groups=2)
    cos = diag["cosine"]
    assert cos[0][1] == pytest.approx(1.0, abs=1e-12)
    assert cos[0][2] == pytest.approx(-1.0, abs=1e-12)
    assert_close(diag["norm"]["v_times_4"], 4 * diag["norm"]["v"])
    for group in diag["groups"]:
        assert diag["cosine_by_group"][group][0][1] == pytest.approx(1.0, abs=1e-12)
    assert cos[3][4] == 0.0 and cos[4][3] == 0.0  # orthogonal: no tensor in common
    assert diag["norm_by_group"]["embed"]["only_layers"] == 0.0
    assert diag["cosine_by_group"]["embed"][4] == [0.0] * 6  # a zero-norm row is all 0
    assert diag["norm"]["zero"] == 0.0
    assert cos[5] == [0.0] * 6 and [row[5] for row in cos] == [0.0] * 6
    assert mean_offdiagonal([[1.0, 0.2], [0.2, 1.0]]) == pytest.approx(0.2)
    assert math.isnan(mean_offdiagonal([[1.0]]))


# ---- bad input ------------------------------------------------------------------------------
def test_a_missing_tensor_names_the_file_and_the_tensor(tmp_path, vectors, vector_files):
    lacking = dict(vectors[1])
    del lacking["model.layers.2.mlp.up_proj.weight"]
    bad = write(tmp_path, "lacking", lacking)
    with pytest.raises(VectorError, match=re.escape(str(bad))) as err:
        vector_diagnostics([vector_files[0], bad], ["a", "b"])
    assert "model.layers.2.mlp.up_proj.weight" in str(err.value)
    # the other way round: the first file lacks it, the second has an extra tensor
    with pytest.raises(VectorError, match=re.escape(str(vector_files[0]))) as err:
        vector_diagnostics([bad, vector_files[0]], ["b", "a"])
    assert "model.layers.2.mlp.up_proj.weight" in str(err.value)


def test_a_shape_mismatch_names_the_file_and_the_tensor(tmp_path, vectors, vector_files):
    reshaped = dict(vectors[2])
    reshaped["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(32, 16)
    bad = write(tmp_path, "reshaped", reshaped)
    with pytest.raises(VectorError, match=re.escape(str(bad))) as err:
        vector_diagnostics([*vector_files, bad], [*NAMES, "reshaped"])
    assert "model.layers.1.self_attn.k_proj.weight" in str(err.value)


def test_non_finite_and_unreadable_vectors_name_the_file(tmp_path, vectors, vector_files):
    broken = dict(vectors[0])
    broken["model.norm.weight"] = torch.full((32,), float("nan"))
    bad = write(tmp_path, "nan", broken)
    with pytest.raises(VectorError, match=re.escape(str(bad))) as err:
        vector_diagnostics([vector_files[1], bad], ["a", "b"])
    assert "model.norm.weight" in str(err.value)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(VectorError, match=re.escape(str(junk))):
        vector_diagnostics([vector_files[0], junk], ["a", "b"])
    with pytest.raises(ValueError, match="names"):
        vector_diagnostics(vector_files, NAMES[:2])


# ---- rendering ---------------------------------------------------------------------------
def synthetic_diag(k: int, groups: list[str], seed: int = 0) -> dict:
    """A diagnostics dict of the real shape, without vector files."""
    gen = torch.Generator().manual_seed(seed)
    names = [f"dataset_{i}" for i in range(k)]

    def matrix():
        x = torch.randn(k, 6, generator=gen, dtype=torch.float64)
        x = x / x.norm(dim=1, keepdim=True)
        return (x @ x.T).clamp(-1, 1).tolist()

    return {
        "datasets": names,
        "groups": groups,
        "norm": {n: float(i + 1) * 0.123456 for i, n in enumerate(names)},
        "cosine": matrix(),
        "norm_by_group": {
            g: {n: 0.01 * (i + j + 1) for i, n in enumerate(names)} for j, g in enumerate(groups)
        },  # fmt: skip
        "cosine_by_group": {g: matrix() for g in groups},
        "parameters_by_group": {g: 1000 * (j + 1) for j, g in enumerate(groups)},
    }


def test_plot_similarity_writes_a_readable_png(tmp_path, vector_files):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    diag = vector_diagnostics(vector_files, NAMES)
    path = plot_similarity(diag, tmp_path / "out" / "similarity.png")
    assert path == tmp_path / "out" / "similarity.png"
    pixels = plt.imread(str(path))
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 400
    assert float(pixels[..., :3].std()) > 0.01  # not one colour
    assert not list((tmp_path / "out").glob(".*tmp*"))  # written whole, no temp left
    eight = synthetic_diag(8, ["embed", "block0", "block1", "block2", "block3", "head"])
    pixels = plt.imread(str(plot_similarity(eight, tmp_path / "eight.png")))
    assert float(pixels[..., :3].std()) > 0.01


def test_markdown_tables_hold_each_dataset_and_the_rounded_numbers(vector_files):
    diag = vector_diagnostics(vector_files, NAMES, groups=2)
    lines = diagnostics_markdown(diag)
    assert all(isinstance(line, str) and "\n" not in line for line in lines)
    text = "\n".join(lines)
    table_rows = [line for line in lines if line.startswith("| ")]
    for i, name in enumerate(NAMES):
        norm_row = next(
            r for r in table_rows if r.startswith(f"| {name} | {fmt_norm(diag['norm'][name])} |")
        )
        for group in diag["groups"]:
            assert f" {fmt_norm(diag['norm_by_group'][group][name])} " in norm_row
        cos_row = "| " + " | ".join([name, *map(fmt_cosine, diag["cosine"][i])]) + " |"
        assert cos_row in lines
    for i in range(3):
        for j in range(i + 1, 3):
            pair = next(r for r in table_rows if r.startswith(f"| {NAMES[i]} / {NAMES[j]} |"))
            cells = [c.strip() for c in pair.strip("|").split("|")]
            assert cells[1:] == [fmt_cosine(diag["cosine"][i][j]),
                                 *(fmt_cosine(diag["cosine_by_group"][g][i][j])
                                   for g in diag["groups"])]  # fmt: skip
    mean = fmt_cosine(mean_offdiagonal(diag["cosine"]))
    assert f"mean pairwise cosine {mean}" in text.lower()
    assert "independent directions" in lines[-1] and "interfere" in lines[-1]
    assert fmt_cosine(-0.0001) == "0.000" and fmt_cosine(0.31) == "0.310"


def test_markdown_leaves_out_empty_groups_and_copes_with_one_vector():
    diag = synthetic_diag(1, ["embed", "block0", "head"])
    diag["parameters_by_group"]["embed"] = 0
    lines = diagnostics_markdown(diag)
    assert "| dataset | model | block0 | head |" in lines
    assert "no pairs" in lines[-1]
