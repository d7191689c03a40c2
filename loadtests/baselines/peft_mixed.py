"""Baseline (b): PEFT's mixed-adapter batch, ``generate(..., adapter_names=[...])``, without continuous batching.

All adapters are loaded into one ``PeftModel``. The worker takes whatever is waiting, in
arrival order, up to ``--max-batch`` requests of any adapters (base-model requests use
PEFT's ``"__base__"``), and runs one greedy ``generate`` over the left-padded batch with
one adapter name per row, streaming tokens as they come. PEFT applies each adapter to
its rows' sub-batch in every LoRA layer. A new batch starts only when the previous one
has finished (every row done), so requests that arrive meanwhile wait.

Run: ``python -m loadtests.baselines.peft_mixed --model DIR --adapters-dir STORE --port P``
"""

from __future__ import annotations

from loadtests.baselines.openai_http import parser, serve
from loadtests.baselines.peft_swap import load_peft
from loadtests.baselines.worker import Job, Worker
from server.model.loading import LoadedModel

BASE = "__base__"  # PEFT's adapter name for "no adapter" in adapter_names


class MixedWorker(Worker):
    def load(self, loaded: LoadedModel) -> None:
        self.model = load_peft(loaded, self.adapter_paths)

    def pick(self, waiting: list[Job]) -> list[Job]:
        return waiting[: self.max_batch]

    def run_batch(self, jobs: list[Job]) -> None:
        if self.model is None:
            self.generate(self.loaded.hf_model, jobs)
            return
        self.generate(self.model, jobs, adapter_names=[BASE if j.adapter is None else j.adapter for j in jobs])


def main() -> None:
    args = parser(__doc__.split("\n\n")[0]).parse_args()
    serve(MixedWorker(args.model, args.adapters_dir, args.cache_dir, args.max_batch), args.port, args.log_level)


if __name__ == "__main__":
    main()
