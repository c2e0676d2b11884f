"""`finetune.method: lora` through every stage on real local Ray: PEFT adapters, low-rank
vectors, a search on the evaluators' low-rank merge, and a merged full model that equals
the base plus the weighted adapters' deltas as PEFT itself merges them."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dem_ray.config import parse_config
from dem_ray.core.perplexity import objective, perplexity, token_nll
from dem_ray.pipeline import Pipeline

LORA = {"rank": 4, "alpha": 8.0, "target_modules": "all-linear"}


@pytest.fixture(scope="module")
def lora_run(ray_session, pretrained_base, tiny_data, make_config, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    data = {n: tiny_data[n] for n in ("code", "letters")}
    raw = make_config(root / "run", pretrained_base, data,
                      finetune={"method": "lora", "lora": LORA, "max_steps": 8},
                      search={"num_trials": 4})  # fmt: skip
    config_path = root / "config.yaml"
    config_path.write_text(json.dumps(raw))
    pipeline = Pipeline(parse_config(raw, source=str(config_path)))
    pipeline.run()
    return pipeline, raw


def _peft_merged(base_dir, adapter_dir) -> dict[str, torch.Tensor]:
    """The fine-tune as PEFT merges it: base + the adapter's delta, every tensor."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def test_finetunes_are_adapters_and_vectors_stay_low_rank(lora_run):
    pipeline, _ = lora_run
    base = load_file(pipeline.ctx.base_dir / "model.safetensors")
    for name in pipeline.names:
        tuned = pipeline.layout.finetune(name)
        assert (tuned / "adapter_config.json").exists()
        assert not (tuned / "model.safetensors").exists()
        vector = load_file(pipeline.layout.vector(name))
        assert vector and all(k.endswith(("::A", "::B")) for k in vector)
        for key, tensor in vector.items():
            d_out, d_in = base[key.rsplit("::", 1)[0]].shape
            assert tuple(tensor.shape) == ((4, d_in) if key.endswith("::A") else (d_out, 4))


def test_merged_model_is_base_plus_weighted_peft_deltas(lora_run):
    pipeline, _ = lora_run
    weights = pipeline.report()["best_weights"]
    base_dir = pipeline.ctx.base_dir
    base = load_file(base_dir / "model.safetensors")
    merged = load_file(pipeline.run_dir / "merged" / "model.safetensors")
    assert merged.keys() == base.keys()
    tuned = {n: _peft_merged(base_dir, pipeline.layout.finetune(n)) for n in pipeline.names}
    moved = 0
    for key in base:
        b = base[key].double()
        expected = b + sum(weights[n] * (tuned[n][key].double() - b) for n in pipeline.names)
        torch.testing.assert_close(merged[key].double(), expected, rtol=0, atol=1e-6, msg=key)
        moved += not torch.equal(merged[key], base[key])
    assert moved >= 7 * 2  # every linear layer of both decoder layers moved


def test_report_matches_a_recomputation_on_the_merged_and_peft_models(lora_run):
    from transformers import AutoModelForCausalLM

    from dem_ray.ray.evaluator import sample_rows

    pipeline, raw = lora_run
    report = pipeline.report()
    limit = raw["evaluator"]["max_validation_sequences"]
    models = {"dem": AutoModelForCausalLM.from_pretrained(pipeline.run_dir / "merged")}
    for name in pipeline.names:
        model = AutoModelForCausalLM.from_pretrained(pipeline.ctx.base_dir)
        model.load_state_dict(_peft_merged(pipeline.ctx.base_dir, pipeline.layout.finetune(name)))
        models[f"finetuned/{name}"] = model
    for label, model in models.items():
        model.eval()
        nll = {}
        for name in pipeline.names:
            rows = load_file(pipeline.layout.shard(name, "validation"))["input_ids"]
            rows = sample_rows(rows, limit, pipeline.cfg.finetune.seed)
            nll[name] = token_nll(model, rows, batch_size=5)
            assert report["ppl"][label][name] == pytest.approx(perplexity(*nll[name]), rel=1e-4)
        assert report["objectives"][label] == pytest.approx(objective(nll), rel=1e-5)
    assert report["objective"]["value"] == pytest.approx(report["objectives"]["dem"])
