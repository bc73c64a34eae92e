"""Time and memory of product aggregation (lora.aggregation = "product", FlexLoRA), dense vs QR.

- 100 client adapters of mixed ranks {2, 4, 8, 16} with SmolLM2-135M's module shapes (30 layers x 7
  linear modules), aggregated as a run does (``product_svd``'s automatic route: with a stacked rank of
  about 750 above the modules' sides, that is the dense SVD for every module) into a rank-16 adapter;
- one 4096 x 11008 module (Llama-2-7B's MLP) at K = 5 clients of rank 16: the QR path against the
  dense route (form the d x n sum, then its SVD), each in a child process for its own peak RSS.
"""

from __future__ import annotations

from benchmarks.rounds import in_child

SMOLLM2_MODULES = {"q_proj": (576, 576), "k_proj": (576, 192), "v_proj": (576, 192), "o_proj": (576, 576),
                   "gate_proj": (576, 1536), "up_proj": (576, 1536), "down_proj": (1536, 576)}  # (in, out)


def run(quick: bool = False) -> dict:
    clients = 20 if quick else 100
    res = {"smollm2": in_child(f"""
        import json, time, torch
        from fedit import config, hetero
        from fedit.protocol import Update
        layers, mods = 30, {SMOLLM2_MODULES!r}
        cfg = config.load(None, ["lora.r=16", "lora.alpha=16", "lora.client_ranks=[2,4,8,16]", "lora.aggregation=product"])
        plan = hetero.LoraPlan(cfg, hetero.client_loras(cfg, list(range({clients})), set(mods)))
        keys = [(f"l{{i}}.{{m}}", n_in, n_out) for i in range(layers) for m, (n_in, n_out) in mods.items()]
        g = {{}}
        for k, n_in, n_out in keys:
            g[k + ".lora_A.weight"] = torch.zeros(16, n_in)
            g[k + ".lora_B.weight"] = torch.zeros(n_out, 16)
        gen = torch.Generator().manual_seed(0)
        def updates():
            for c in range({clients}):
                r = plan.profile(c).r
                a = {{}}
                for k, n_in, n_out in keys:
                    a[k + ".lora_A.weight"] = torch.randn(r, n_in, generator=gen) * 0.02
                    a[k + ".lora_B.weight"] = torch.randn(n_out, r, generator=gen) * 0.02
                yield Update(c, {{"adapter": a}}, 100)
        t = time.perf_counter(); made = sum(1 for _ in updates()); make = time.perf_counter() - t
        gen.manual_seed(0)
        base = peak_rss_mb()
        t = time.perf_counter(); new, used = plan.product_mean(g, updates()); total = time.perf_counter() - t
        print(json.dumps({{"clients": used, "seconds": total - make, "peak_rss_increase_mb": peak_rss_mb() - base,
                          "modules": len(keys)}}))
    """)}
    for route in ("qr", "dense"):
        res[f"module_7b_{route}"] = in_child(f"""
            import json, time, torch
            from fedit import lowrank
            gen = torch.Generator().manual_seed(0)
            bs = [torch.randn(11008, 16, generator=gen) for _ in range(5)]
            as_ = [torch.randn(16, 4096, generator=gen) for _ in range(5)]
            w = [0.2] * 5
            base = peak_rss_mb()
            t = time.perf_counter()
            u, s, vh = lowrank.product_svd(bs, as_, w, route={route!r})
            b, a = lowrank.truncate(u, s, vh, 16, 1.0)
            print(json.dumps({{"seconds": time.perf_counter() - t, "peak_rss_increase_mb": peak_rss_mb() - base,
                              "top_singular_value": float(s[0])}}))
        """)
    return res


def rows(r: dict) -> list[str]:
    s, q, d = r["smollm2"], r["module_7b_qr"], r["module_7b_dense"]
    return [f"| product aggregation (FlexLoRA) of {s['clients']} SmolLM2-135M adapters of ranks 2-16 "
            f"({s['modules']} modules) into rank 16 | {s['seconds']:.1f} s, peak RSS +{s['peak_rss_increase_mb']:.0f} MB |",
            f"| one 4096 x 11008 module, 5 clients of rank 16: QR path vs dense sum + SVD | {q['seconds']:.2f} s, "
            f"+{q['peak_rss_increase_mb']:.0f} MB vs {d['seconds']:.1f} s, +{d['peak_rss_increase_mb']:.0f} MB |"]


if __name__ == "__main__":
    import json

    res = run()
    print(json.dumps(res, indent=2))
    print("\n".join(rows(res)))
