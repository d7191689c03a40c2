"""Baseline (c): merged weights, one full model copy per adapter, for a few adapters.

At start-up each adapter is merged into its own copy of the base model
(``PeftModel.from_pretrained`` on a deep copy, then ``merge_and_unload``); the base
model serves base requests. More than ``--max-adapters`` adapters (default 8) is
refused before anything loads: every copy costs the full model's memory. Batching is
as in :mod:`~loadtests.baselines.peft_swap`: the adapter whose request has waited
longest, all its waiting requests (up to ``--max-batch``), one greedy ``generate`` on
that adapter's merged model, streaming tokens as they come; no LoRA work per token.

Run: ``python -m loadtests.baselines.merged --model DIR --adapters-dir STORE --port P [--max-adapters 8]``
"""

from __future__ import annotations

import copy

from peft import PeftModel
from transformers import PreTrainedModel

from loadtests.baselines.openai_http import parser, serve
from loadtests.baselines.worker import Job, Worker, adapter_folders, oldest_adapter_group
from server.model.loading import LoadedModel


class MergedWorker(Worker):
    def load(self, loaded: LoadedModel) -> None:
        self.models: dict[str | None, PreTrainedModel] = {None: loaded.hf_model}
        for name, folder in self.adapter_paths.items():
            peft = PeftModel.from_pretrained(copy.deepcopy(loaded.hf_model), folder)
            self.models[name] = peft.merge_and_unload().eval()

    def pick(self, waiting: list[Job]) -> list[Job]:
        return oldest_adapter_group(waiting, self.max_batch)

    def run_batch(self, jobs: list[Job]) -> None:
        self.generate(self.models[jobs[0].adapter], jobs)


def main() -> None:
    p = parser(__doc__.split("\n\n")[0])
    p.add_argument("--max-adapters", type=int, default=8, help="refuse a store with more adapters than this")
    args = p.parse_args()
    count = len(adapter_folders(args.adapters_dir)) if args.adapters_dir.is_dir() else 0
    if count > args.max_adapters:
        p.error(
            f"{args.adapters_dir} holds {count} adapters but --max-adapters is {args.max_adapters}: "
            f"the merged baseline keeps one full model copy per adapter; use fewer adapters or raise the limit"
        )
    serve(MergedWorker(args.model, args.adapters_dir, args.cache_dir, args.max_batch), args.port, args.log_level)


if __name__ == "__main__":
    main()
