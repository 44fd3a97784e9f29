"""Data-parallel circuit-tuning against DDP full fine-tuning: step time with 1 and N processes and bytes
all-reduced per step.

    python bench/bench_distributed.py [--model gpt2-small] [--worlds 1,2] [--batch 8 --seq 64] [--steps 3]
                                      [--backend gloo|nccl]

Each world size is a fresh set of spawned processes (gloo on CPU, one thread per process when the cores
are shared; nccl on GPUs: one per rank). The global batch (``--batch`` x ``--seq``) is split over the ranks.
Methods: ``ddp_full`` (DistributedDataParallel + torch.optim.AdamW; its all-reduced bytes are counted by a
DDP communication hook), ``circuit_dropin`` (DistributedDataParallel + ``CircuitAdamW(..., model=ddp,
top_n=N)``, N for about 5% of the parameters; bytes from ``opt.last_step.comm_bytes``), and
``tuner_reused_streamed`` / ``tuner_reused_blocking`` (``CircuitTuner`` reusing its first circuit: the compact
gradients averaged while the backward runs — the default on GPUs — or after it), and ``fsdp_dropin`` (the drop-in
optimizer on an FSDP2 ``fully_shard`` model: per-rank parameter and optimizer-state bytes against DDP's). Reports the ratio of
circuit bytes to (compact circuit gradient bytes + score matrix bytes) — the target is <= 1.2 — and to DDP's.
Writes ``bench/results/<device>_distributed.json``.
"""

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _counting_allreduce(state, bucket):
    state["bytes"] += bucket.buffer().numel() * bucket.buffer().element_size()
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
    return allreduce_hook(None, bucket)


def _worker(rank, world, init, args, out):
    device = torch.device(f"cuda:{rank}") if args.backend == "nccl" else torch.device("cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    else:
        torch.cuda.set_device(device)
    dist.init_process_group(args.backend, init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    import ct_fast
    from ct_fast.app import harness
    from ct_fast.app.step_bench import build, make_batches

    base = build(args.model, device, torch.float32)
    data = make_batches(base.config.vocab_size, args.batch, args.seq, args.steps + 1, device)
    shard = args.batch // world
    data = [{k: v[rank * shard:(rank + 1) * shard] for k, v in b.items()} for b in data]
    records = {}
    for method in ("ddp_full", "circuit_dropin", "tuner_reused_streamed", "tuner_reused_blocking", "fsdp_dropin"):
        model = build(args.model, device, torch.float32)
        model.load_state_dict(base.state_dict())
        if method == "fsdp_dropin":  # parameters and optimizer state sharded: per-rank bytes fall with the world
            from ct_fast.app.launch import Launch

            ddp = Launch(world, rank, parallel="fsdp").wrap(model)
        else:
            ddp = torch.nn.parallel.DistributedDataParallel(model)
        state = {"bytes": 0}
        if method == "ddp_full":
            ddp.register_comm_hook(state, _counting_allreduce)
            opt = torch.optim.AdamW(ddp.parameters(), lr=1e-5)
        elif method in ("circuit_dropin", "fsdp_dropin"):
            opt = ct_fast.CircuitAdamW(ddp.parameters(), lr=1e-5, model=ddp, top_n=args.top_n)
        else:  # the circuit of the first step, reused: its gradients averaged while the backward runs, or after it
            opt = ct_fast.CircuitAdamW(ddp.parameters(), lr=1e-5)
            tuner = ct_fast.CircuitTuner(ddp, opt, top_n=args.top_n, refresh_every=10 ** 6,
                                         overlap_comm=method == "tuner_reused_streamed")
        times, comm = [], []
        for i, b in enumerate(data):
            state["bytes"] = 0
            harness.sync(device)
            t0 = time.perf_counter()
            if method.startswith("tuner"):
                tuner.step(b)
            else:
                ddp(**b).loss.backward()
                opt.step()
                opt.zero_grad()
            harness.sync(device)
            if i:  # the first step warms up
                times.append(time.perf_counter() - t0)
            comm.append(state["bytes"] if method == "ddp_full" else opt.last_step.comm_bytes)
        rec = {"median_ms": 1e3 * statistics.median(times), "bytes_per_step": comm[-1]}
        if method == "circuit_dropin":
            last = opt.last_step
            rec["compact_grad_bytes"] = sum(g.numel() * g.element_size() for g in last.grads.values())
            rec["score_bytes"] = 4 * opt.tuning.graph.edge_mask.numel()  # the fp32 [n_up, n_down] score matrix
            rec["tuned_fraction"] = last.circuit.fraction
        if method.startswith("tuner"):
            rec["overlapped_bytes_per_step"] = opt.last_step.overlapped_bytes
        if method in ("circuit_dropin", "fsdp_dropin"):  # this rank's share (rank 0's; FSDP2 shards are even)
            from ct_fast.distributed import local

            rec["param_bytes_per_rank"] = sum(local(p).numel() * p.element_size() for p in model.parameters())
            rec["state_bytes_per_rank"] = opt.state_bytes()
        records[method] = rec
        del ddp, model, opt
        tuner = None
    if rank == 0:
        torch.save(records, out)
    dist.destroy_process_group()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gpt2-small")
    ap.add_argument("--worlds", default="1,2")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top-n", type=int, default=None, help="default: about 5%% of the parameters")
    ap.add_argument("--backend", default="nccl" if torch.cuda.is_available() else "gloo")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    from ct_fast.app import harness
    from ct_fast.app.step_bench import build, choose_top_n, make_batches

    if args.top_n is None:
        base = build(args.model, "cpu", torch.float32)
        args.top_n = choose_top_n(base, make_batches(base.config.vocab_size, args.batch, args.seq, 1, "cpu")[0], 0.05)
    results = []
    for world in [int(w) for w in args.worlds.split(",")]:
        init, out = tempfile.mktemp(prefix="ct_fast_bench_"), tempfile.mktemp(suffix=".pt")
        mp.start_processes(_worker, args=(world, init, args, out), nprocs=world, join=True, start_method="spawn")
        rec = torch.load(out, weights_only=False)
        os.remove(out)
        c, full = rec["circuit_dropin"], rec["ddp_full"]
        c["bytes_over_grad_and_scores"] = c["bytes_per_step"] / (c["compact_grad_bytes"] + c["score_bytes"])
        c["bytes_over_ddp_full"] = c["bytes_per_step"] / max(1, full["bytes_per_step"])
        results.append({"world": world, "model": args.model, "batch": args.batch, "seq": args.seq,
                        "top_n": args.top_n, "backend": args.backend, **rec})
        print(f"world {world}: ddp_full {full['median_ms']:.0f} ms/step, {full['bytes_per_step'] / 2**20:.1f} MiB "
              f"all-reduced; circuit_dropin {c['median_ms']:.0f} ms/step, {c['bytes_per_step'] / 2**20:.2f} MiB "
              f"({c['bytes_over_grad_and_scores']:.2f}x compact grads + scores, {100 * c['bytes_over_ddp_full']:.1f}% "
              f"of DDP's; circuit {100 * c['tuned_fraction']:.1f}% of params)")
        s, b = rec["tuner_reused_streamed"], rec["tuner_reused_blocking"]
        print(f"  reused circuit, tuner: gradients averaged during the backward {s['median_ms']:.0f} ms/step "
              f"({s['overlapped_bytes_per_step'] / 2**20:.2f} MiB launched early), after it {b['median_ms']:.0f} ms/step")
        f = rec["fsdp_dropin"]
        print(f"  per rank: DDP {c['param_bytes_per_rank'] / 2**20:.0f} MiB parameters + {c['state_bytes_per_rank'] / 2**20:.0f} "
              f"MiB optimizer state; FSDP2 {f['param_bytes_per_rank'] / 2**20:.0f} + {f['state_bytes_per_rank'] / 2**20:.0f} MiB "
              f"({f['median_ms']:.0f} ms/step)")
    device = "cuda" if args.backend == "nccl" else "cpu"
    print(harness.write(f"{device}_distributed", results, args.out))


if __name__ == "__main__":
    main()
