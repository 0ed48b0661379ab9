"""lm-eval fitness tasks: lm-eval's HFLM (what evomerge uses) against evomerge's own batched scorers.

Issue 16, item 4 asks whether to wrap lm-eval's `HFLM` or to feed lm-eval's prompts to evomerge's
batched scorers (`ExactMatchScorer`, `MultipleChoiceScorer`). This times both on the same items,
one torch thread, CPU (or the GPU when present), requests and prompts built once, best of `--reps`:

* `zoo_addition`: the small zoo's addition expert on its 1,000 validation items, generation, through
  `fitness/examples/lm_eval_zoo_addition.yaml` (lm-eval's exact_match) and the `zoo_addition` preset
  (needs `evomerge zoo build --size small`; skipped without it);
* `random_mc` / `random_gen`: a random 4-layer, 256-wide Llama over a printable-ASCII tokenizer,
  1,000 three-way multiple-choice sums (lm-eval's acc) and 1,000 greedy generations of 6 tokens;
* `simple_evaluate`: lm-eval's own entry point on the random multiple-choice task, which rebuilds
  the requests on every call.

    .venv/bin/python benchmarks/lm_eval_scoring.py          # from the project root; ~1 minute
"""
from __future__ import annotations

import argparse
import json
import logging
import string
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def _best(fn, reps):
    times, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def _ascii_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + list(string.printable))}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def _random_tasks(folder: Path, n: int):
    import yaml

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        a, b = (int(x) for x in rng.integers(0, 100, 2))
        choices = sorted({a + b, a + b + 1, a + b - 2})
        rows.append({"id": f"v{i}", "prompt": f"Q: {a}+{b}=", "choices": [str(c) for c in choices],
                     "label": choices.index(a + b), "answer": str(a + b)})
    (folder / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"validation": str(folder / "validation.jsonl")}},
              "validation_split": "validation", "doc_to_text": "{{prompt}}"}
    (folder / "mc.yaml").write_text(yaml.safe_dump({"task": "bench_mc", **common, "output_type": "multiple_choice",
                                                    "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}",
                                                    "metric_list": [{"metric": "acc"}]}))
    (folder / "gen.yaml").write_text(yaml.safe_dump({"task": "bench_gen", **common, "output_type": "generate_until",
                                                     "doc_to_target": "{{answer}}", "metric_list": [{"metric": "exact_match"}],
                                                     "generation_kwargs": {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from evomerge._device import default_device
    from evomerge.fitness.scoring import ExactMatchScorer
    from evomerge.fitness.sealed import sealed_test
    from evomerge.fitness.tasks import TaskSpec, load_task

    datasets.disable_progress_bars()
    device = default_device(None)
    print(f"device {device}, one torch thread, best of {args.reps}")
    with sealed_test("benchmark on validation"):
        if Path("zoo/small/models/addition").is_dir():
            tokenizer = AutoTokenizer.from_pretrained("zoo/small/models/addition")
            model = AutoModelForCausalLM.from_pretrained("zoo/small/models/addition").to(device).eval()
            native, through = load_task("zoo_addition"), load_task("fitness/examples/lm_eval_zoo_addition.yaml")
            a, b = native.load_split("fitness"), through.load_split("fitness")
            ta, ra = _best(lambda s=native.make_scorer(tokenizer, a, device=device): s(model), args.reps)
            tb, rb = _best(lambda s=through.make_scorer(tokenizer, b, device=device): s(model), args.reps)
            print(f"zoo_addition ({len(a)} items, generation): HFLM {tb:.2f}s acc {rb.mean():.4f} | evomerge "
                  f"ExactMatchScorer {ta:.2f}s acc {ra.mean():.4f} | per-item equal {int((ra == rb).sum())}/{len(ra)}")
        else:
            print("zoo_addition: skipped (no zoo/small; evomerge zoo build --size small)")
        tokenizer = _ascii_tokenizer()
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                             intermediate_size=512, vocab_size=len(tokenizer),
                                             max_position_embeddings=256)).to(device).eval()
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            _random_tasks(folder, args.items)
            mc = TaskSpec.from_dict({"name": "mc", "lm_eval": {"task": "bench_mc", "include_path": str(folder)}})
            docs = mc.load_split("fitness")
            tb, rb = _best(lambda s=mc.make_scorer(tokenizer, docs, device=device): s(model), args.reps)
            native = TaskSpec.from_dict({"name": "mc_native", "dataset": {"files": {"validation": str(folder / "validation.jsonl")}},
                                         "prompt": "{prompt}", "scorer": "multiple_choice", "choices": "{choices}",
                                         "choice_template": " {choice}", "answer_index": "{label}", "batch_size": 64})
            ndocs = native.load_split("fitness")
            ta, ra = _best(lambda s=native.make_scorer(tokenizer, ndocs, device=device): s(model), args.reps)
            print(f"random_mc ({len(docs)} items, 3 choices): HFLM {tb:.2f}s acc {rb.mean():.4f} | evomerge "
                  f"MultipleChoiceScorer {ta:.2f}s acc {ra.mean():.4f} | per-item equal {int((ra == rb).sum())}/{len(ra)}")
            gen = TaskSpec.from_dict({"name": "gen", "lm_eval": {"task": "bench_gen", "include_path": str(folder)}})
            scorer = gen.make_scorer(tokenizer, gen.load_split("fitness"), device=device)
            lm = scorer._hflm(model)
            tb, texts_b = _best(lambda: lm.generate_until(scorer._instances, disable_tqdm=True), args.reps)
            prompts = [r.args[0] for r in scorer._instances]
            ours = ExactMatchScorer(tokenizer, prompts, None, batch_size=64, max_new_tokens=6, device=device)
            ta, texts_a = _best(lambda: ours.decode(model), args.reps)
            same = sum(x.split("\n")[0] == y for x, y in zip(texts_a, texts_b))
            print(f"random_gen ({len(prompts)} items, 6 tokens): HFLM {tb:.2f}s | evomerge ExactMatchScorer {ta:.2f}s | "
                  f"texts equal {same}/{len(prompts)}")
            import lm_eval
            from lm_eval.models.huggingface import HFLM
            from lm_eval.tasks import TaskManager

            manager = TaskManager(include_path=str(folder), include_defaults=False)
            hflm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=64)
            ts, result = _best(lambda: lm_eval.simple_evaluate(model=hflm, tasks=["bench_mc"], task_manager=manager,
                                                                bootstrap_iters=0), args.reps)
            print(f"simple_evaluate random_mc: {ts:.2f}s per call, acc {result['results']['bench_mc']['acc,none']:.4f}")


if __name__ == "__main__":
    main()
