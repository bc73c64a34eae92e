"""The model cache filled by one process at a time: parties tried on one machine fetch the default model at once."""

from __future__ import annotations

import threading
import time

from fedit import weights


def test_concurrent_first_uses_convert_a_gguf_once(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDIT_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    calls = []

    def slow_convert(src, target):  # stands in for the dequantisation: long enough for the others to arrive
        calls.append(src)
        time.sleep(0.5)
        target.mkdir(parents=True)
        (target / "config.json").write_text("{}")
        return target

    monkeypatch.setattr(weights, "_convert", slow_convert)
    out = []
    threads = [threading.Thread(target=lambda: out.append(weights.convert_gguf(gguf))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(out)) == 1 and (out[0] / "config.json").is_file()
