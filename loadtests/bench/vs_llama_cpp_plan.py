"""What ``loadtests.bench.vs_llama_cpp`` runs: the systems, the workloads, and which pairs meet on which.

Pure: no I/O. ``LORAPLEX_ARGS`` is the table of loraplex's flags per precision (edit freely).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from loadtests.llama_cpp.convert import SHIPPED
from loadtests.workload import WorkloadSpec

# loraplex's flags per precision (beside --max-lora-rank/--max-loras); edit freely. A row whose server refuses
# to start is skipped with the reason.
LORAPLEX_ARGS: dict[str, list[str]] = {
    "float32": ["--dtype", "float32", "--quantization", "none"],
    "bfloat16": ["--dtype", "bfloat16", "--quantization", "none"],
    # Quantized rows take 8-bit activations in decode steps, as llama.cpp's Q8_0/Q4_1 dot products do
    # (loraplex's default, --activations exact, multiplies fp32 activations by the dequantized codes instead).
    "int8": ["--dtype", "float32", "--quantization", "int8", "--activations", "int8"],
    "q4_1": ["--dtype", "float32", "--quantization", "auto", "--activations", "int8"],  # the GGUF's own Q4_1
    "q4_1_exact": ["--dtype", "float32"],  # loraplex's default on the default model: Q4_1 codes, fp32 activations
}
# the llama-server GGUF each loraplex precision is compared with at the same precision (weights)
SAME_PRECISION = {"float32": "f32", "bfloat16": "bf16", "int8": "q8_0", "q4_1": "q4_1", "q4_1_exact": "q4_1"}
# the GGUF type of the adapters served beside each base GGUF (loraplex serves adapters in its serving dtype)
ADAPTER_OUTTYPE = {"f32": "f32", "bf16": "bf16", "q8_0": "f32", "q4_1": "f32"}
RANK = 16


@dataclass(frozen=True)
class Sizes:
    prompt_words: int = 128  # ~1 token per word (see loadtests.workload.WORDS)
    new_tokens: int = 128
    single_requests: int = 3  # measured one-stream requests per kind (after one warm-up request)
    requests: int = 64
    concurrency: int = 16
    adapters: int = 16


FULL = Sizes()
QUICK = Sizes(new_tokens=32, single_requests=2, requests=16, concurrency=4, adapters=4)


@dataclass(frozen=True)
class System:
    kind: str  # "loraplex" or "llama_cpp"
    precision: str  # loraplex: a LORAPLEX_ARGS key; llama_cpp: a GGUF precision (PRECISIONS)

    @property
    def label(self) -> str:
        return f"loraplex {self.precision}" if self.kind == "loraplex" else f"llama.cpp {self.precision}"


@dataclass(frozen=True)
class Workload:
    name: str
    spec: WorkloadSpec
    concurrency: int

    @property
    def warmup(self) -> WorkloadSpec:
        """One wave of short requests (8 tokens) with the next seed: adapters loaded, code paths warm."""
        return dataclasses.replace(self.spec, seed=self.spec.seed + 1, num_requests=self.concurrency, output_len=(8, 8))


@dataclass(frozen=True)
class Phase:
    """Workloads run against one server per system, the systems in turn."""

    name: str
    workloads: tuple[Workload, ...]
    pairs: tuple[tuple[System, System], ...]  # (loraplex system, llama.cpp system), compared on every workload

    @property
    def systems(self) -> tuple[System, ...]:
        """Each system once, in the order the pairs name them: loraplex, llama.cpp, loraplex, ..."""
        return tuple(dict.fromkeys(s for pair in self.pairs for s in pair))

    @property
    def concurrency(self) -> int:
        return max(w.concurrency for w in self.workloads)

    def comparisons(self) -> list[tuple[Workload, System, System]]:
        return [(w, lp, peer) for w in self.workloads for lp, peer in self.pairs]


def workloads(sizes: Sizes) -> dict[str, Workload]:
    def spec(adapters: int, requests: int) -> WorkloadSpec:
        return WorkloadSpec(
            num_adapters=adapters,
            base_share=0.0 if adapters else 1.0,
            alpha=1.0,
            rate=float("inf"),
            num_requests=requests,
            prompt_len=(sizes.prompt_words, sizes.prompt_words),
            output_len=(sizes.new_tokens, sizes.new_tokens),
            seed=0,
        )

    n, c = sizes.requests, sizes.concurrency
    return {
        "single_base": Workload("one stream, base", spec(0, sizes.single_requests), 1),
        "single_adapter": Workload("one stream, one adapter", spec(1, sizes.single_requests), 1),
        "many_base": Workload(f"{n} requests at concurrency {c}, base", spec(0, n), c),
        "many_adapters": Workload(
            f"{n} requests at concurrency {c}, {sizes.adapters} adapters", spec(sizes.adapters, n), c
        ),
    }


def plan(sizes: Sizes, precisions: list[str]) -> list[Phase]:
    """The phases for the llama.cpp ``precisions`` asked for (a subset of PRECISIONS), in run order.

    One stream: each loraplex precision against its llama.cpp twin (one phase per llama.cpp GGUF).
    Concurrent, base: float32 against f32.
    Concurrent, adapters: float32 against f32, the GGUF's Q4_1 against Q4_1, float32 against Q4_1.
    """
    w = workloads(sizes)

    def pair(lp: str, gguf: str) -> tuple[System, System]:
        return System("loraplex", lp), System("llama_cpp", gguf)

    phases = []
    for gguf in dict.fromkeys(SAME_PRECISION.values()):
        if gguf in precisions:
            lps = [lp for lp, g in SAME_PRECISION.items() if g == gguf]
            phases.append(Phase(f"one stream, {lps[0]}", (w["single_base"], w["single_adapter"]),
                                tuple(pair(lp, gguf) for lp in lps)))
    if "f32" in precisions:
        phases.append(Phase("concurrent, base", (w["many_base"],), (pair("float32", "f32"),)))
    wanted = (("float32", "f32"), ("q4_1", SHIPPED), ("float32", SHIPPED))
    pairs = tuple(pair(lp, gguf) for lp, gguf in wanted if gguf in precisions)
    if pairs:
        phases.append(Phase("concurrent, adapters", (w["many_adapters"],), pairs))
    return phases
