"""Edge attribution on SmolLM2-135M: graph size, EAP and EAP-IG time and peak memory, top edges.

Usage: ``.venv/bin/python benchmarks/bench_edges.py [n_prompts] [steps] [exact_top] [threads]``
(defaults 16 IOI prompt pairs, EAP-IG with 5 steps, exact patching of the 10 top EAP and EAP-IG
edges, torch's default thread count). On a machine shared with other jobs, 1 thread can be
several times faster than 2 (the threads of each parallel op wait for each other).
Peak memory is the process's maximum resident set size (``ru_maxrss``), read after each step:
the model's weights are in it.
"""

from __future__ import annotations

import resource
import sys
import time


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    import torch

    from workbench.edges import eap_ig_scores, eap_scores, edge_graph, exact_edge_patching
    from workbench.runner import ModelPool
    from workbench.tasks import build_task

    n_prompts = int(sys.argv[1]) if len(sys.argv) > 1 else 16
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    exact_top = int(sys.argv[3]) if len(sys.argv) > 3 else 10
    if len(sys.argv) > 4:
        torch.set_num_threads(int(sys.argv[4]))
    t = time.perf_counter()
    model = ModelPool().get("smollm2-135m")
    print(f"model: {model} ({time.perf_counter() - t:.1f} s), threads {torch.get_num_threads()}")
    print(f"peak RSS after load: {_rss_mib():.0f} MiB")
    graph = edge_graph(model)
    print(f"edges: {graph.counts()}")
    ps = build_task("ioi", model.codec, {"n_prompts": n_prompts})
    print(f"prompts: {ps}")

    t = time.perf_counter()
    res = eap_scores(model, ps)
    print(f"EAP: {time.perf_counter() - t:.2f} s, peak RSS {_rss_mib():.0f} MiB, info {res.info}")
    t = time.perf_counter()
    ig = eap_ig_scores(model, ps, steps=steps)
    print(f"EAP-IG m={steps}: {time.perf_counter() - t:.2f} s, peak RSS {_rss_mib():.0f} MiB")

    print("top 10 edges by |EAP| (EAP, EAP-IG):")
    ig_scores = ig.as_dict()
    for name, value in res.top(10):
        print(f"  {name:>18}  {value:+.4f}  {ig_scores[name]:+.4f}")
    print("top 10 edges by |EAP-IG|:")
    for name, value in ig.top(10):
        print(f"  {name:>18}  {value:+.4f}")

    if exact_top:
        chosen = [n for n, _ in res.top(exact_top)] + [n for n, _ in ig.top(exact_top)]
        chosen = list(dict.fromkeys(chosen))
        t = time.perf_counter()
        ex = exact_edge_patching(model, ps, chosen)
        took = time.perf_counter() - t
        print(
            f"exact patching of {len(chosen)} edges: {took:.2f} s, peak RSS {_rss_mib():.0f} MiB, "
            f"{ex.info['forwards']:.2f} forward units, from position "
            f"{ex.info['first_recomputed_position']}"
        )
        exact = ex.as_dict()
        eap_d = res.as_dict()
        print(f"  {'edge':>18}  {'EAP':>8}  {'EAP-IG':>8}  {'exact':>8}")
        for name in chosen:
            print(f"  {name:>18}  {eap_d[name]:+.4f}  {ig_scores[name]:+.4f}  {exact[name]:+.4f}")


if __name__ == "__main__":
    main()
