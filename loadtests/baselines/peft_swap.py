"""Baseline (a): PEFT with one active adapter at a time (the PEFT baseline of the S-LoRA paper).

All adapters are loaded into one ``PeftModel`` (``load_adapter``). The worker takes the
adapter whose request has waited longest, batches every waiting request of that adapter
(up to ``--max-batch``, oldest first), activates it with ``set_adapter`` (base-model
requests form their own group, run under ``disable_adapter()``) and runs one greedy
``generate`` over the left-padded batch, streaming tokens as they come. Requests that
arrive meanwhile wait for the next batch, even those for the active adapter.

Run: ``python -m loadtests.baselines.peft_swap --model DIR --adapters-dir STORE --port P``
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from peft import PeftModel

from loadtests.baselines.openai_http import parser, serve
from loadtests.baselines.worker import Job, Worker, oldest_adapter_group
from server.model.loading import LoadedModel


def load_peft(loaded: LoadedModel, adapters: dict[str, Path]) -> PeftModel | None:
    """One ``PeftModel`` over ``loaded``'s model holding every adapter under its name; None without adapters."""
    if not adapters:
        return None
    (first, path), *rest = adapters.items()
    model = PeftModel.from_pretrained(loaded.hf_model, path, adapter_name=first)
    for name, folder in rest:
        model.load_adapter(folder, adapter_name=name)
    return model.eval()


class SwapWorker(Worker):
    def load(self, loaded: LoadedModel) -> None:
        self.model = load_peft(loaded, self.adapter_paths)
        self.active: str | None = None

    def pick(self, waiting: list[Job]) -> list[Job]:
        return oldest_adapter_group(waiting, self.max_batch)

    def run_batch(self, jobs: list[Job]) -> None:
        adapter = jobs[0].adapter
        if self.model is None:
            self.generate(self.loaded.hf_model, jobs)
            return
        if adapter is None:
            context = self.model.disable_adapter()
        else:
            if adapter != self.active:
                self.model.set_adapter(adapter)
                self.active = adapter
            context = contextlib.nullcontext()
        with context:
            self.generate(self.model, jobs)


def main() -> None:
    args = parser(__doc__.split("\n\n")[0]).parse_args()
    serve(SwapWorker(args.model, args.adapters_dir, args.cache_dir, args.max_batch), args.port, args.log_level)


if __name__ == "__main__":
    main()
