"""lm-eval's `local-completions` model scoring a small local JSON task through `gptzoo serve`
gives the log-likelihoods of gptzoo's own `evaluate` (`nox -s lmeval`: lm-eval is heavy, so it
is installed only there). lm-eval tokenizes through the server's vLLM-style /tokenize."""

import json

import live_server
import numpy as np
import pytest
from conftest import SHAKESPEARE
from live_server import KEY

import gptzoo

server = live_server.server  # a live server for this module

pytestmark = pytest.mark.lmeval


def summed_logprob(model, tokens) -> float:
    """The log-probability of `tokens` after the first, from `gptzoo.evaluate`'s mean loss."""
    result = gptzoo.evaluate(model, np.asarray(tokens, np.int32), model.block_size)
    return -result.loss * result.n_tokens


def test_local_completions_scores_the_loglikelihoods_of_evaluate(server, trained_run, tmp_path,
                                                                 monkeypatch):
    import lm_eval

    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # for completions; auth_token for /tokenize
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text = SHAKESPEARE.read_text()
    # Contexts that end in a space would lose it to the continuation (lm-eval's rule).
    docs = [{"context": text[i:i + 20], "completion": text[i + 20:i + 30]}
            for i in range(0, 1000, 50) if not text[i + 19].isspace()][:5]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    task = {"task": "gptzoo_shakespeare", "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test",
            "output_type": "loglikelihood", "doc_to_text": "{{context}}",
            "doc_to_target": "{{completion}}", "target_delimiter": "",
            "metric_list": [{"metric": "acc"}]}
    results = lm_eval.simple_evaluate(
        model="local-completions", tasks=[task], log_samples=True,
        model_args={"model": "tiny", "base_url": f"{server.url}/v1/completions",
                    "tokenizer_backend": "remote", "auth_token": KEY, "max_length": 32,
                    "num_concurrent": 1})
    samples = sorted(results["samples"]["gptzoo_shakespeare"], key=lambda s: s["doc_id"])

    model, tokenizer = gptzoo.load(trained_run)
    for doc, sample in zip(docs, samples, strict=True):
        context = tokenizer.encode(doc["context"])
        whole = tokenizer.encode(doc["context"] + doc["completion"])
        expected = summed_logprob(model, whole) - summed_logprob(model, context)
        loglikelihood, _ = sample["resps"][0][0]
        assert abs(loglikelihood - expected) < 1e-3
