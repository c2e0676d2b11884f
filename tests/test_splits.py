"""Train, validation and test splits, the seeded sample of a capped shard, and a report
whose verdict is on test (validation chose the weights and the best mixture)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from dem_ray.config import parse_config
from dem_ray.core.perplexity import objective, perplexity, token_nll
from dem_ray.data.readers import DataError, split_documents, split_off, split_three
from dem_ray.models.tiny import synthetic_corpus, write_jsonl
from dem_ray.pipeline import Pipeline
from dem_ray.ray.evaluator import Evaluator, sample_rows
from dem_ray.stages.prepare import split_dataset

DOCS = [f"doc {i}: " + t for i, t in enumerate(synthetic_corpus("code", 60, seed=2))]


# ---- the document-level split ------------------------------------------------------------
def test_three_way_split_is_disjoint_covering_and_seeded() -> None:
    train, val, test = split_three(DOCS, 0.15, 0.1, seed=3)
    assert (len(train), len(val), len(test)) == (60 - 9 - 6, 9, 6)  # ceil(9.0), ceil(6.0)
    assert set(train).isdisjoint(val) and set(train).isdisjoint(test)
    assert set(val).isdisjoint(test)
    assert sorted(train + val + test) == sorted(DOCS)
    for part in (train, val, test):  # every part keeps the documents' order
        assert part == [d for d in DOCS if d in set(part)]
    assert split_three(DOCS, 0.15, 0.1, seed=3) == (train, val, test)
    assert split_three(DOCS, 0.15, 0.1, seed=4)[2] != test
    # Validation is what the two-way split holds out with this seed; test comes after it.
    assert split_documents(DOCS, 0.15, seed=3)[1] == val


def test_split_off_refuses_parts_that_take_everything() -> None:
    with pytest.raises(DataError, match="only 2 documents: too few to split off a validation "
                       "and a test part"):  # fmt: skip
        split_off(["a", "b"], {"validation": 0.05, "test": 0.05}, 0)
    with pytest.raises(DataError, match="only 10 documents"):
        split_three([str(i) for i in range(10)], 0.5, 0.5, 0)


@pytest.fixture
def files(tmp_path):
    """A training file and separate validation and test files, every document unique."""
    return {
        "path": write_jsonl(tmp_path / "train.jsonl", DOCS),
        "validation_path": write_jsonl(tmp_path / "val.jsonl", [f"val {i}" for i in range(10)]),
        "test_path": write_jsonl(tmp_path / "test.jsonl", [f"test {i}" for i in range(10)]),
    }


OTHER = synthetic_corpus("numbers", 60, seed=3)  # a second dataset: a run mixes two or more


def _raw(tiny_base, make_config, tmp_path, dataset: dict, **overrides) -> dict:
    other = write_jsonl(tmp_path / "other.jsonl", OTHER)
    raw = make_config(tmp_path / "run", tiny_base, {"code": dataset["path"], "other": other},
                      **overrides)  # fmt: skip
    raw["datasets"]["code"].update({k: v if isinstance(v, float) else str(v)
                                    for k, v in dataset.items()})  # fmt: skip
    return raw


def _splits(tiny_base, make_config, tmp_path, dataset: dict, seed: int = 0):
    raw = _raw(tiny_base, make_config, tmp_path, dataset, finetune={"seed": seed})
    pipeline = Pipeline(parse_config(raw))
    pipeline.open()
    try:
        return split_dataset(pipeline.ctx, "code")
    finally:
        pipeline.close()


@pytest.mark.parametrize(
    "given", [(), ("validation_path",), ("test_path",), ("validation_path", "test_path")]
)
def test_each_combination_of_files_gives_disjoint_seeded_splits(
    given, files, tiny_base, make_config, tmp_path
) -> None:
    dataset = {"path": files["path"], **{k: files[k] for k in given}}
    train, val, test = _splits(tiny_base, make_config, tmp_path, dataset)
    assert set(train).isdisjoint(val) and set(train).isdisjoint(test)
    assert set(val).isdisjoint(test)
    read = {k: [json.loads(x)["text"] for x in files[k].read_text().splitlines()] for k in files}
    if "validation_path" in given:
        assert val == read["validation_path"]
    else:
        assert len(val) == 9 and set(val) <= set(DOCS)  # validation_fraction 0.15 of 60
    if "test_path" in given:
        assert test == read["test_path"]
    else:
        assert len(test) == 6 and set(test) <= set(DOCS)  # test_fraction 0.1 of 60
    # What is not held out of `path` for validation or test is train: train loses them.
    held = [d for d in (*val, *test) if d in set(DOCS)]
    assert sorted(train + held) == sorted(DOCS)
    again = _splits(tiny_base, make_config, tmp_path, dataset)
    assert again == (train, val, test)
    if len(given) < 2:  # something was split off `path`: another seed splits it otherwise
        other = _splits(tiny_base, make_config, tmp_path, dataset, seed=1)
        assert other != (train, val, test)
        assert set(other[0]).isdisjoint(other[1]) and set(other[0]).isdisjoint(other[2])


# ---- errors --------------------------------------------------------------------------------
def _prepare(tiny_base, make_config, tmp_path, dataset: dict) -> Pipeline:
    raw = _raw(tiny_base, make_config, tmp_path, dataset)
    pipeline = Pipeline(parse_config(raw))
    pipeline.open()
    try:
        pipeline.run_command("prepare")
    finally:
        pipeline.close()
    return pipeline


def test_a_test_file_too_small_for_one_row_names_dataset_and_file(
    files, tiny_base, make_config, tmp_path
) -> None:
    tiny = write_jsonl(tmp_path / "tiny-test.jsonl", ["x = 1"])
    with pytest.raises(DataError) as info:
        _prepare(tiny_base, make_config, tmp_path, {"path": files["path"], "test_path": tiny})
    message = str(info.value)
    assert "dataset 'code'" in message and str(tiny) in message
    assert "test split" in message and "test_path" in message


def test_a_test_fraction_too_small_for_one_row_names_dataset_and_file(
    files, tiny_base, make_config, tmp_path
) -> None:
    short = write_jsonl(tmp_path / "short.jsonl", [f"x = {i}" for i in range(30)])
    dataset = {"path": short, "validation_path": files["path"], "test_fraction": 0.05}
    with pytest.raises(DataError) as info:  # 2 documents of test, a few tokens each
        _prepare(tiny_base, make_config, tmp_path, dataset)
    message = str(info.value)
    assert "dataset 'code'" in message and str(short) in message
    assert "test split" in message and "raise test_fraction" in message


def test_too_few_documents_for_three_splits_names_dataset_and_file(
    tiny_base, make_config, tmp_path
) -> None:
    two = write_jsonl(tmp_path / "two.jsonl", ["x = 1", "y = 2"])
    with pytest.raises(DataError) as info:
        _prepare(tiny_base, make_config, tmp_path, {"path": two})
    message = str(info.value)
    assert "dataset 'code'" in message and str(two) in message
    assert "too few to split off a validation and a test part" in message


def test_prepare_writes_and_records_the_test_shard(files, tiny_base, make_config, tmp_path):
    pipeline = _prepare(tiny_base, make_config, tmp_path, {"path": files["path"]})
    entry = pipeline.manifest.entry("data/code")
    shards = {s: pipeline.layout.shard("code", s) for s in ("train", "validation", "test")}
    for split, path in shards.items():
        assert path.name == f"code.{split}.safetensors"
        assert path.relative_to(pipeline.run_dir).as_posix() in entry["outputs"]
        assert load_file(path)["input_ids"].shape[0] > 0
    assert entry["test_rows"] == load_file(shards["test"])["input_ids"].shape[0]
    assert entry["test_documents"] == 6
    with pytest.raises(ValueError, match="no split 'dev'"):
        pipeline.layout.shard("code", "dev")


def test_data_inputs_include_the_test_file(files, tiny_base, make_config, tmp_path) -> None:
    from dem_ray.stages.prepare import BaseStage, DataStage

    def digests(dataset: dict) -> list:
        pipeline = Pipeline(parse_config(_raw(tiny_base, make_config, tmp_path, dataset)))
        pipeline.open()
        try:
            pipeline.run_stage(BaseStage())  # the data steps' inputs name the prepared base
            [step] = [s for s in DataStage().steps(pipeline.ctx) if s.key == "data/code"]
            return step.inputs["files"]
        finally:
            pipeline.close()

    with_test = {"path": files["path"], "test_path": files["test_path"]}
    before = digests(with_test)
    assert len(before) == 2
    write_jsonl(files["test_path"], ["another test document"])
    assert digests(with_test)[1] != before[1] and digests(with_test)[0] == before[0]
    assert "test_path" in DataStage.invalidated_by["files"]


# ---- the seeded sample of a capped shard ----------------------------------------------------
def test_sample_rows_is_seeded_random_in_file_order() -> None:
    rows = torch.arange(100, dtype=torch.int32).view(100, 1)
    kept = sample_rows(rows, 10, seed=0)[:, 0].tolist()
    assert len(kept) == 10 and kept == sorted(kept) and len(set(kept)) == 10
    assert kept != list(range(10))  # not the first rows
    assert sample_rows(rows, 10, seed=0)[:, 0].tolist() == kept
    assert sample_rows(rows, 10, seed=1)[:, 0].tolist() != kept
    assert torch.equal(sample_rows(rows, None, 0), rows)
    assert torch.equal(sample_rows(rows, 100, 0), rows)
    assert torch.equal(sample_rows(rows, 500, 0), rows)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Shards whose row i holds token i, so the rows kept can be read off."""
    root = tmp_path_factory.mktemp("sampled")
    paths = {}
    for split, count in (("validation", 40), ("test", 30)):
        rows = torch.arange(count, dtype=torch.int32).view(count, 1).repeat(1, 16)
        paths[split] = str(root / f"a.{split}.safetensors")
        save_file({"input_ids": rows}, paths[split])
    return paths


def _evaluator(tiny_base, shards, seed: int) -> Evaluator:
    return Evaluator(str(tiny_base), [], {"a": shards["validation"]}, batch_size=4,
                     max_sequences=10, device="cpu", test_paths={"a": shards["test"]},
                     sample_seed=seed)  # fmt: skip


def test_the_evaluator_keeps_the_same_seeded_sample_for_validation_and_test(tiny_base, shards):
    first, second = _evaluator(tiny_base, shards, 0), _evaluator(tiny_base, shards, 0)
    other = _evaluator(tiny_base, shards, 5)
    for attr in ("shards", "test_shards"):
        rows = getattr(first, attr)["a"].rows[:, 0].tolist()
        assert len(rows) == 10 and rows == sorted(rows) and rows != list(range(10))
        assert getattr(second, attr)["a"].rows[:, 0].tolist() == rows  # the same in every actor
        assert getattr(other, attr)["a"].rows[:, 0].tolist() != rows  # the seed decides
    assert first.info()["test_tokens"] == {"a": 10 * 15}
    val = first.evaluate_checkpoint(str(tiny_base))
    test = first.evaluate_checkpoint(str(tiny_base), split="test")
    assert val["tokens"] == test["tokens"] == 10 * 15 and val["nll"] != test["nll"]
    assert first.evaluate([], split="test")["nll"] == test["nll"]  # no vectors: the base
    with pytest.raises(ValueError, match="no split 'train'"):
        first.evaluate([], split="train")
    bare = Evaluator(str(tiny_base), [], {"a": shards["validation"]}, device="cpu")
    with pytest.raises(ValueError, match="no test shards"):
        bare.evaluate_checkpoint(str(tiny_base), split="test")


def test_the_sample_seed_is_part_of_every_score(files, tiny_base, make_config, tmp_path):
    from dem_ray.ray.pool import PoolSpec

    _prepare(tiny_base, make_config, tmp_path, {"path": files["path"]})

    def inputs(seed: int) -> dict:
        raw = _raw(tiny_base, make_config, tmp_path, {"path": files["path"]},
                   finetune={"seed": seed})  # fmt: skip
        pipeline = Pipeline(parse_config(raw))
        pipeline.open()
        try:
            return pipeline.ctx.evaluation_inputs()
        finally:
            pipeline.close()

    assert inputs(0)["sample_seed"] == 0 and inputs(1)["sample_seed"] == 1
    # ... and of what an evaluator pool is: a pool sampled otherwise is started again.
    ev = parse_config(_raw(tiny_base, make_config, tmp_path, {"path": files["path"]})).evaluator
    spec = PoolSpec("base", [], {"code": "v"}, False, test_paths={"code": "t"})
    assert PoolSpec("base", [], {"code": "v"}, False, test_paths={"code": "t"},
                    sample_seed=1).key(ev) != spec.key(ev)  # fmt: skip
    assert PoolSpec("base", [], {"code": "v"}, False).key(ev) != spec.key(ev)


# ---- end to end: the report on test -----------------------------------------------------------
@pytest.fixture(scope="module")
def tested(ray_session, tiny_base, tiny_data, make_config, tmp_path_factory):
    """Two datasets (one split three ways from its file, one with its own test file), a
    two-mixture baseline; capped shards, so the seeded sample decides the rows."""
    root = tmp_path_factory.mktemp("splits")
    data = {n: tiny_data[n] for n in ("numbers", "letters")}
    test_file = write_jsonl(root / "letters-test.jsonl", synthetic_corpus("letters", 40, seed=5))
    raw = make_config(root / "run", tiny_base, data,
                      finetune={"max_steps": 4, "seed": 3},
                      search={"num_trials": 2, "max_concurrent": 1},
                      evaluator={"max_validation_sequences": 8},
                      baseline={"grid_step": 1.0, "steps": 4})  # fmt: skip
    raw["datasets"]["letters"]["test_path"] = str(test_file)
    pipeline = Pipeline(parse_config(raw))
    pipeline.run()
    return pipeline, raw


def _sampled(path, limit: int, seed: int) -> torch.Tensor:
    """The rule, written out again: a seeded permutation's first `limit` rows, in order."""
    rows = load_file(path)["input_ids"]
    if rows.shape[0] <= limit:
        return rows
    keep = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(seed))[:limit]
    return rows[torch.sort(keep).values]


def test_report_has_test_scores_for_every_model(tested):
    pipeline, raw = tested
    report = pipeline.report()
    mixtures = pipeline.manifest.entry("baseline")["mixtures"]
    assert len(mixtures) == 2  # grid step 1: each dataset alone
    labels = {"base", "dem", "finetuned/numbers", "finetuned/letters", "baseline/best",
              *(f"mixture/{mid}" for mid in mixtures)}  # fmt: skip
    assert set(report["ppl"]) == labels
    assert list(report["test_ppl"]) == list(report["ppl"])  # the same shape, the same order
    assert list(report["test_objectives"]) == list(report["objectives"])
    for label in labels:
        assert set(report["test_ppl"][label]) == set(report["datasets"])
        assert all(math.isfinite(v) and v > 1 for v in report["test_ppl"][label].values())
    limit, seq = raw["evaluator"]["max_validation_sequences"], raw["finetune"]["seq_len"]
    for name in pipeline.names:
        rows = load_file(pipeline.layout.shard(name, "test"))["input_ids"].shape[0]
        assert rows > limit  # the cap and the sample are in play
        assert report["test_tokens"][name] == limit * (seq - 1)
    for mid in pipeline.manifest.entry("baseline")["mixtures"]:
        entry = pipeline.manifest.entry(f"baseline/{mid}")
        assert report["test_ppl"][f"mixture/{mid}"] == entry["test_ppl"]
        nll = {n: tuple(v) for n, v in entry["test_nll"].items()}
        assert report["test_objectives"][f"mixture/{mid}"] == pytest.approx(objective(nll))
        assert entry["test_ppl"] != entry["ppl"]
    best = report["baseline"]["best"]["id"]
    assert report["test_ppl"]["baseline/best"] == report["test_ppl"][f"mixture/{best}"]
    # The best mixture is chosen on validation, whatever test says.
    scored = report["baseline"]["mixtures"]
    assert best == min(scored, key=lambda m: m["objective"])["id"]
    # The search saw validation only.
    for line in pipeline.layout.trials.read_text().splitlines():
        assert json.loads(line)["tokens_evaluated"] == sum(report["validation_tokens"].values())


def test_test_scores_match_a_recomputation(tested):
    pipeline, raw = tested
    report = pipeline.report()
    limit, seed = raw["evaluator"]["max_validation_sequences"], raw["finetune"]["seed"]
    models = {"base": pipeline.ctx.base_dir, "dem": pipeline.layout.merged,
              "baseline/best": pipeline.layout.best_mixture}  # fmt: skip
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the evaluator actor ran: the same float32 sums
    try:
        for label, path in models.items():
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(path).eval()
            nll = {}
            for name in pipeline.names:
                rows = _sampled(pipeline.layout.shard(name, "test"), limit, seed)
                with torch.no_grad():
                    nll[name] = token_nll(model, rows, batch_size=pipeline.cfg.evaluator.batch_size)
                assert report["test_ppl"][label][name] == pytest.approx(
                    perplexity(*nll[name]), rel=1e-6
                ), (label, name)
            assert report["test_objectives"][label] == pytest.approx(objective(nll), rel=1e-6)
    finally:
        torch.set_num_threads(threads)
    assert report["objective"]["test_value"] == report["test_objectives"]["dem"]


def test_the_verdict_is_made_on_test(tested):
    pipeline, _ = tested
    report = pipeline.report()
    summary = report["summary"]
    dem, best = report["test_objectives"]["dem"], report["baseline"]["best"]["test_objective"]
    assert summary.startswith("On the test split, DEM reached")
    assert f"{dem:.4f}" in summary and f"reached {best:.4f} on the test split" in summary
    verdict = "better" if dem < best else "worse"
    assert f"so DEM is {verdict} by {abs(best - dem):.4f} on the test split" in summary
    if f"{report['objectives']['dem']:.4f}" != f"{dem:.4f}":
        assert f"{report['objectives']['dem']:.4f}" not in summary
    markdown = (pipeline.run_dir / "report" / "report.md").read_text()
    page = (pipeline.run_dir / "report" / "report.html").read_text()
    for text in (markdown, page):
        assert "Validation perplexity" in text and "Test perplexity" in text
        for label, values in report["test_ppl"].items():
            for name in report["datasets"]:
                assert f"{values[name]:.3f}" in text, (label, name)
