"""Tests for dem_ray.data.cloze and `corpora.build(..., cloze=N)`: held-out multiple-choice cloze
tasks for lm-evaluation-harness (no Ray; lm_eval only in the one test that loads a task)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import yaml

from dem_ray.data import cloze, corpora
from dem_ray.data.cloze import (
    CONTEXT_CHARS,
    CONTINUATION_CHARS,
    build_cloze_tasks,
    cloze_item,
    make_cloze_items,
)
from dem_ray.data.corpora import CORPORA, CorpusUnavailable, build, records

YAML_KEYS = [
    "task",
    "dataset_path",
    "dataset_kwargs",
    "test_split",
    "output_type",
    "doc_to_text",
    "doc_to_choice",
    "doc_to_target",
    "metric_list",
    "metadata",
]


def _words(prefix: str, n: int) -> str:
    return " ".join(f"{prefix}{i}" for i in range(n))


def _key(row: dict) -> str:
    return json.dumps(row, sort_keys=True, ensure_ascii=False)


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _check_pair(pair: tuple[str, str] | None) -> tuple[str, str]:
    assert pair is not None
    context, continuation = pair
    assert context and continuation
    assert context == context.rstrip() and not context[0].isspace()
    assert continuation == continuation.strip()
    return context, continuation


# --------------------------------------------------------------------------------------------
# cloze_item


def test_cloze_item_text() -> None:
    text = _words("w", 300)  # ~1700 chars
    context, continuation = _check_pair(cloze_item("text", {"text": text}))
    assert CONTEXT_CHARS - 10 <= len(context) <= CONTEXT_CHARS
    assert CONTINUATION_CHARS - 10 <= len(continuation) <= CONTINUATION_CHARS
    # Cut at whitespace: whole words, the continuation right after the context.
    assert text.startswith(context + " " + continuation + " ")
    # Line breaks inside are kept; the join between the two parts may be any whitespace.
    lines = "\n".join(_words(f"l{i}x", 8) for i in range(40))
    context, continuation = _check_pair(cloze_item("text", {"text": lines}))
    assert "\n" in context
    joined = lines.replace("\n", " ")
    assert joined.startswith(context.replace("\n", " ") + " " + continuation.replace("\n", " "))
    # A shorter text is split in the same proportion; a tiny one gives no item.
    short = _words("s", 20)  # ~70 chars
    context, continuation = _check_pair(cloze_item("text", {"text": short}))
    assert short == context + " " + continuation or short.startswith(context + " " + continuation)
    assert len(context) > len(continuation)
    assert cloze_item("text", {"text": "A: hi\nB: yo"}) is None
    assert cloze_item("text", {"text": "   "}) is None
    # A word longer than the limit is cut hard rather than dropped.
    context, continuation = _check_pair(cloze_item("text", {"text": "x" * 2000}))
    assert context == "x" * CONTEXT_CHARS
    assert continuation == "x" * CONTINUATION_CHARS


def test_cloze_item_prompt_completion() -> None:
    row = {"prompt": 'def f(x):\n    """Double x."""', "completion": "    return 2 * x\n"}
    assert cloze_item("prompt_completion", row) == (
        'def f(x):\n    """Double x."""',
        "return 2 * x",
    )
    long_prompt = "\n".join(_words(f"p{i}_", 6) for i in range(60))
    long_completion = _words("c", 200)
    row = {"prompt": long_prompt + "\n", "completion": long_completion}
    context, continuation = _check_pair(cloze_item("prompt_completion", row))
    assert len(context) <= CONTEXT_CHARS
    assert long_prompt.endswith(context)
    assert long_prompt[-len(context) - 1] == "\n"  # starts at a line boundary
    assert len(continuation) <= CONTINUATION_CHARS
    assert long_completion.startswith(continuation + " ")
    # A prompt without line breaks is cut at whitespace.
    row = {"prompt": _words("q", 200), "completion": "done"}
    context, continuation = _check_pair(cloze_item("prompt_completion", row))
    assert row["prompt"].endswith(" " + context) and len(context) <= CONTEXT_CHARS
    assert continuation == "done"


def test_cloze_item_chat() -> None:
    row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "How are you?\nReally?"},
            {"role": "assistant", "content": " Fine, thanks. "},
        ]
    }
    assert cloze_item("chat", row) == (
        "System: Be brief.\nUser: Hi there\nAssistant: Hello!\n"
        "User: How are you?\nReally?\nAssistant:",
        "Fine, thanks.",
    )
    # A trailing user turn: the last assistant message is the continuation.
    row = {
        "messages": [
            {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "A1"},
            {"role": "user", "content": "Q2"},
        ]
    }
    assert cloze_item("chat", row) == ("User: Q1\nAssistant:", "A1")
    # No assistant turn, or nothing before the last one: no item.
    assert cloze_item("chat", {"messages": [{"role": "user", "content": "Q"}]}) is None
    assert cloze_item("chat", {"messages": [{"role": "assistant", "content": "A"}]}) is None
    only_reply = [{"role": "assistant", "content": "A"}, {"role": "user", "content": "Q"}]
    assert cloze_item("chat", {"messages": only_reply}) is None
    # A long history keeps its end, cut at a line boundary, and still ends with 'Assistant:'.
    turns = [{"role": "system", "content": "You are a bot."}]
    for i in range(30):
        turns += [
            {"role": "user", "content": f"question {i} " + _words("u", 5)},
            {"role": "assistant", "content": f"answer {i}"},
        ]
    turns[-1] = {"role": "assistant", "content": _words("reply", 60)}
    context, continuation = _check_pair(cloze_item("chat", {"messages": turns}))
    assert len(context) <= CONTEXT_CHARS
    assert context.endswith("\nUser: question 29 u0 u1 u2 u3 u4\nAssistant:")
    assert context.startswith(("User: ", "Assistant: "))
    assert "System:" not in context
    assert len(continuation) <= CONTINUATION_CHARS
    assert turns[-1]["content"].startswith(continuation + " ")


def test_cloze_item_unknown_format() -> None:
    with pytest.raises(ValueError, match="unknown format"):
        cloze_item("parquet", {"text": "x"})


# --------------------------------------------------------------------------------------------
# build_cloze_tasks on hand-made corpora


def _fake_held_out() -> dict[str, tuple[str, list[dict]]]:
    text_rows = [{"text": _words(f"alpha{i}_", 150)} for i in range(6)]
    text_rows.append({"text": "too short"})  # makes no item
    pc_rows = [
        {
            "prompt": f"def beta{i}():\n    " + _words("doc", 10),
            "completion": _words(f"beta{i}_", 9),
        }
        for i in range(5)
    ]
    chat_rows = [
        {
            "messages": [
                {"role": "system", "content": "Answer with 'quotes', \\backslashes\\ and {{x}}."},
                {"role": "user", "content": f"gamma question {i}?\nsecond line"},
                {
                    "role": "assistant",
                    "content": f'gamma{i} \u00e9t\u00e9 "r\u00e9ponse" {{{{y}}}}',
                },
            ]
        }
        for i in range(4)
    ]
    return {
        "alpha": ("text", text_rows),
        "beta": ("prompt_completion", pc_rows),
        "gamma": ("chat", chat_rows),
    }


def test_build_cloze_tasks(tmp_path: Path) -> None:
    held_out = _fake_held_out()
    pairs = {
        name: [p for p in (cloze_item(fmt, r) for r in rows) if p is not None]
        for name, (fmt, rows) in held_out.items()
    }
    assert [len(p) for p in pairs.values()] == [6, 5, 4]
    paths = build_cloze_tasks(held_out, tmp_path, choices=4, seed=7)
    assert set(paths) == set(held_out)
    folder = tmp_path / "cloze"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"cloze_{n}.{ext}" for n in held_out for ext in ("jsonl", "yaml")
    )  # no temp files left behind
    for name, path in paths.items():
        assert path == folder / f"cloze_{name}.yaml"
        data = folder / f"cloze_{name}.jsonl"
        lines = data.read_text(encoding="utf-8").splitlines()
        items = [json.loads(line) for line in lines]
        assert lines == [json.dumps(it, ensure_ascii=False) for it in items]
        assert len(items) == len(pairs[name])
        others = {c for other, ps in pairs.items() if other != name for _, c in ps}
        for item, (context, truth) in zip(items, pairs[name], strict=True):
            assert list(item) == ["context", "choices", "label"]
            assert item["context"] == context
            assert len(item["choices"]) == 4
            assert len(set(item["choices"])) == 4
            assert item["choices"][item["label"]] == truth
            distractors = [c for i, c in enumerate(item["choices"]) if i != item["label"]]
            assert set(distractors) <= others
        # The true answer is not always in the same place.
        if len(items) >= 5:
            assert len({it["label"] for it in items}) > 1

        config = yaml.safe_load(path.read_text(encoding="utf-8"))
        assert list(config) == YAML_KEYS
        assert config["task"] == f"cloze_{name}"
        assert config["dataset_path"] == "json"
        test_file = Path(config["dataset_kwargs"]["data_files"]["test"])
        assert test_file.is_absolute() and test_file.is_file()
        assert test_file == data.resolve()
        assert config["test_split"] == "test"
        assert config["output_type"] == "multiple_choice"
        assert config["doc_to_text"] == "{{context}}"
        assert config["doc_to_choice"] == "{{choices}}"
        assert config["doc_to_target"] == "label"
        assert config["metric_list"] == [
            {"metric": m, "aggregation": "mean", "higher_is_better": True}
            for m in ("acc", "acc_norm")
        ]
        assert config["metadata"]["version"] == 1.0
        description = config["metadata"]["description"]
        assert isinstance(description, str) and "\n" not in description
        assert all(other in description for other in held_out if other != name)

    # Same seed -> identical bytes (the YAML names its own folder, so rebuild in place);
    # another seed -> other items.
    before = {p: p.read_bytes() for p in folder.iterdir()}
    build_cloze_tasks(held_out, tmp_path, choices=4, seed=7)
    assert {p: p.read_bytes() for p in folder.iterdir()} == before
    elsewhere = build_cloze_tasks(held_out, tmp_path / "again", choices=4, seed=7)
    for name, path in elsewhere.items():
        assert (
            path.with_suffix(".jsonl").read_bytes()
            == paths[name].with_suffix(".jsonl").read_bytes()
        )
    other_seed = build_cloze_tasks(held_out, tmp_path / "other", choices=4, seed=8)
    assert any(
        other_seed[n].with_suffix(".jsonl").read_bytes()
        != paths[n].with_suffix(".jsonl").read_bytes()
        for n in held_out
    )


def test_build_cloze_tasks_few_distractors_and_errors(tmp_path: Path) -> None:
    held_out = _fake_held_out()
    two = {"alpha": held_out["alpha"], "gamma": (held_out["gamma"][0], held_out["gamma"][1][:2])}
    items = make_cloze_items(two, choices=5, seed=0)
    assert {len(it["choices"]) for it in items["alpha"]} == {3}  # only 2 gamma continuations
    assert {len(it["choices"]) for it in items["gamma"]} == {5}
    with pytest.raises(ValueError, match="at least 2 corpora"):
        build_cloze_tasks({"alpha": held_out["alpha"]}, tmp_path)
    with pytest.raises(ValueError, match="at least 2 choices"):
        build_cloze_tasks(held_out, tmp_path, choices=1)
    with pytest.raises(ValueError, match="'alpha'.*no cloze item|none of its"):
        build_cloze_tasks({"alpha": ("text", [{"text": "x"}]), "beta": held_out["beta"]}, tmp_path)
    # The only other continuation equals the true one: no distractor at all.
    same = {"text": _words("same", 200)}
    with pytest.raises(ValueError, match="distractor"):
        build_cloze_tasks({"a": ("text", [same]), "b": ("text", [dict(same)])}, tmp_path)
    assert not (tmp_path / "cloze").exists()


def test_cloze_module_imports_no_heavy_packages() -> None:
    tree = ast.parse(Path(cloze.__file__).read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported <= {
        "__future__",
        "json",
        "logging",
        "random",
        "collections",
        "pathlib",
        "typing",
        "yaml",
        "dem_ray",
    }, imported
    assert not imported & {"lm_eval", "torch", "ray", "datasets", "transformers"}


# --------------------------------------------------------------------------------------------
# corpora.build(..., cloze=N) on the corpora this installation has


def _available(*names: str) -> list[str]:
    out = []
    for name in names:
        try:
            records(name)
        except CorpusUnavailable:
            continue
        out.append(name)
    return out


def _split_keys(paths: dict[str, Path]) -> tuple[set[str], int]:
    rows = _read_jsonl(paths["train"]) + _read_jsonl(paths["validation"])
    keys = {_key(r) for r in rows}
    assert len(keys) == len(rows)
    return keys, len(rows)


@pytest.mark.parametrize("max_docs", [None, 40])
def test_build_cloze_rows_are_held_out(tmp_path: Path, max_docs: int | None) -> None:
    # code_instruct and docstrings come from the stdlib; the others when their package is here.
    names = ["code_instruct", "docstrings", *_available("chat", "dialogue_turns", "chat_text")]
    if max_docs is None:
        names = names[:3]  # whole corpora: keep it quick
    n = 12
    paths = build(names, tmp_path, max_docs=max_docs, seed=3, cloze=n)
    assert list(paths) == names
    for name in names:
        fmt = CORPORA[name].format
        assert set(paths[name]) == {"train", "validation", "cloze"}
        assert paths[name]["cloze"] == tmp_path / "cloze" / f"cloze_{name}.yaml"
        items = _read_jsonl(tmp_path / "cloze" / f"cloze_{name}.jsonl")
        assert len(items) == n
        split_keys, written = _split_keys(paths[name])
        rows = records(name)
        assert written == (max_docs if max_docs is not None else len(rows) - n)
        # Every item comes from a row that is in neither split.
        by_pair: dict[tuple[str, str], list[str]] = {}
        for row in rows:
            pair = cloze_item(fmt, row)
            if pair is not None:
                by_pair.setdefault(pair, []).append(_key(row))
        held = []
        for item in items:
            truth = item["choices"][item["label"]]
            sources = [k for k in by_pair[(item["context"], truth)] if k not in split_keys]
            assert sources, f"{name}: a cloze item's row is in the train or validation split"
            held.append(sources[0])
        assert len(set(held)) == n
        if max_docs is None:
            # The splits hold exactly the rows that were not held out.
            assert split_keys == {_key(r) for r in rows} - set(held)
        # Distractors are other corpora's held-out continuations.
        others = set()
        for other in names:
            if other != name:
                for it in _read_jsonl(tmp_path / "cloze" / f"cloze_{other}.jsonl"):
                    others.add(it["choices"][it["label"]])
        for item in items:
            assert len(item["choices"]) == 4
            assert {c for i, c in enumerate(item["choices"]) if i != item["label"]} <= others


def test_build_cloze_zero_writes_what_it_wrote_before(tmp_path: Path) -> None:
    names = ["code_instruct", "docstrings", *_available("chat")]
    plain = build(names, tmp_path / "plain", max_docs=30, seed=5)
    zero = build(names, tmp_path / "zero", max_docs=30, seed=5, cloze=0)
    for name in names:
        assert set(zero[name]) == {"train", "validation"}
        for split_name in ("train", "validation"):
            assert zero[name][split_name].read_bytes() == plain[name][split_name].read_bytes()
    assert not (tmp_path / "zero" / "cloze").exists()
    assert sorted(p.name for p in (tmp_path / "zero").iterdir()) == sorted(
        p.name for p in (tmp_path / "plain").iterdir()
    )
    # With cloze, the same build keeps its bytes too, and the split files have the same size.
    a = build(names, tmp_path / "a", max_docs=30, seed=5, cloze=6)
    b = build(names, tmp_path / "b", max_docs=30, seed=5, cloze=6)
    for name in names:
        for split_name in ("train", "validation"):
            assert a[name][split_name].read_bytes() == b[name][split_name].read_bytes()
        data = a[name]["cloze"].with_suffix(".jsonl")
        assert data.read_bytes() == b[name]["cloze"].with_suffix(".jsonl").read_bytes()
        assert len(_read_jsonl(a[name]["train"])) == len(_read_jsonl(plain[name]["train"]))


def test_build_cloze_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="at least 2 distinct corpus names"):
        build(["code_instruct"], out, cloze=5)
    with pytest.raises(ValueError, match="at least 2 distinct corpus names"):
        build(["code_instruct", "code_instruct"], out, cloze=5)
    with pytest.raises(ValueError, match="cloze must be at least 0"):
        build(["code_instruct", "docstrings"], out, cloze=-1)
    with pytest.raises(ValueError, match="cloze_choices"):
        build(["code_instruct", "docstrings"], out, cloze=3, cloze_choices=1)
    n_rows = len(records("docstrings"))
    with pytest.raises(ValueError) as excinfo:
        build(["code_instruct", "docstrings"], out, cloze=n_rows - 1)
    message = str(excinfo.value)
    assert "'docstrings'" in message and str(n_rows) in message and str(n_rows + 1) in message
    assert not out.exists()  # checked before anything is written

    # Enough rows, but too few of them long enough to make an item.
    def fake(name: str) -> tuple[dict, ...]:
        long = tuple({"text": _words(f"{name}{i}_", 100)} for i in range(3))
        return long + tuple({"text": f"short {i}"} for i in range(10))

    monkeypatch.setattr(corpora, "_cached_records", fake)
    with pytest.raises(ValueError, match=r"'code': only 3 of its 13 rows"):
        build(["code", "docstrings"], out, cloze=4)
    assert not out.exists()
    paths = build(["code", "docstrings"], out, cloze=3)
    assert len(_read_jsonl(paths["code"]["cloze"].with_suffix(".jsonl"))) == 3
    assert len(_read_jsonl(paths["code"]["train"]) + _read_jsonl(paths["code"]["validation"])) == 10


def test_build_cloze_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="dem_ray.data.corpora")
    build(["code_instruct", "docstrings"], tmp_path, max_docs=20, cloze=5)
    messages = [r.getMessage() for r in caplog.records if r.name == "dem_ray.data.corpora"]
    for name in ("code_instruct", "docstrings"):
        path = tmp_path / "cloze" / f"cloze_{name}.yaml"
        assert any(f"{name} cloze task: 5 items -> {path}" in m for m in messages), messages


def test_cli_build_cloze(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from dem_ray.cli import main

    out = tmp_path / "out"
    argv = ["corpora", "build", "code_instruct", "docstrings", "--out", str(out)]
    assert main([*argv, "--max-docs", "20", "--cloze", "4", "--cloze-choices", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"code_instruct: {out / 'code_instruct.train.jsonl'} {out / 'code_instruct.val.jsonl'}",
        f"code_instruct cloze task: {out / 'cloze' / 'cloze_code_instruct.yaml'}",
        f"docstrings: {out / 'docstrings.train.jsonl'} {out / 'docstrings.val.jsonl'}",
        f"docstrings cloze task: {out / 'cloze' / 'cloze_docstrings.yaml'}",
    ]
    items = _read_jsonl(out / "cloze" / "cloze_docstrings.jsonl")
    assert len(items) == 4 and {len(it["choices"]) for it in items} == {3}
    # Without --cloze: only the split lines.
    assert main([*argv[:-1], str(tmp_path / "plain"), "--max-docs", "20"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    # One corpus: the error names the problem and exits 2.
    assert main(["corpora", "build", "code_instruct", "--out", str(out), "--cloze", "4"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dem-ray: error: ") and "at least 2 distinct corpus names" in err


# --------------------------------------------------------------------------------------------
# lm-eval reads the task


def test_lm_eval_loads_the_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("lm_eval")
    import datasets.config
    from lm_eval.tasks import TaskManager

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    held_out = _fake_held_out()
    paths = build_cloze_tasks(held_out, tmp_path / "tasks", choices=3, seed=1)
    expected = {name: _read_jsonl(path.with_suffix(".jsonl")) for name, path in paths.items()}
    tm = TaskManager(include_path=str(tmp_path / "tasks" / "cloze"))
    names = [f"cloze_{name}" for name in held_out]
    for task_name in names:
        assert task_name in tm.all_tasks
    loaded = tm.load(names)
    tasks = loaded["tasks"]
    assert set(tasks) == set(names)
    for name, items in expected.items():
        task = tasks[f"cloze_{name}"]
        docs = list(task.test_docs())
        assert len(docs) == len(items)
        for doc, item in zip(docs, items, strict=True):
            # The templates give back exactly what was written (quotes, braces, accents...).
            assert task.doc_to_text(doc) == item["context"]
            assert task.doc_to_choice(doc) == item["choices"]
            assert task.doc_to_target(doc) == item["label"]
