"""End-to-end training steps: circuit-tuning (faithful and amortised) against full fine-tuning, LoRA and the
public reference code's way of doing a step. The benchmark lives in ``ct_fast.app.step_bench`` (``ct-fast bench``);
this script runs it from the source tree, and pytest-benchmark times a tiny step (``pytest bench/``).

    python bench/bench_step.py --models gpt2-small --steps 10
"""

import torch

from ct_fast.app.step_bench import _Method, build, main, make_batches


def test_step_tiny(benchmark):
    model = build("tiny", "cpu", torch.float32)
    data = make_batches(100, 2, 16, 1, "cpu")
    m = _Method("circuit_refresh1", model, 20, "gpt2")
    benchmark(m.step, data[0])


if __name__ == "__main__":
    main()
