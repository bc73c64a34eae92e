"""The commands that use a tuned adapter: `fedit generate`, `fedit chat`, `fedit export`.

``add_parsers(subparsers)`` adds them to the `fedit` parser (fedit/cli.py); ``COMMANDS``
maps each name to its handler ``(args, console)``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedit.errors import FeditError

DEFAULT_MAX_NEW_TOKENS = 256


def _common(p: argparse.ArgumentParser, device_default: str = "auto") -> None:
    p.add_argument("--adapter", required=True, metavar="RUN_DIR_OR_ADAPTER",
                   help="a fedit run directory (its final adapter, or its last round if unfinished) "
                        "or a PEFT adapter directory")
    p.add_argument("--model", default=None,
                   help="base model (hub id, directory, .gguf); default: the one the run was trained on")
    p.add_argument("--device", default=device_default, choices=("auto", "cpu", "cuda"))


def _sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--template", default=None, choices=("alpaca", "chat"),
                   help="prompt template; default: the run's data.template (alpaca, the paper's)")
    p.add_argument("--max-new-tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS,
                   help=f"longest answer in tokens (default {DEFAULT_MAX_NEW_TOKENS})")
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding (the default)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (with --sample; default 0.7)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (with --sample; default 0.9)")
    p.add_argument("--seed", type=int, default=0, help="seed for --sample (default 0)")
    p.add_argument("--dtype", default="auto", choices=("auto", "bf16", "fp32"),
                   help="compute dtype (default auto: bf16 where the CPU/GPU has it)")


def add_parsers(sub) -> None:
    """Add generate, chat and export to the `fedit` subparsers."""
    g = sub.add_parser("generate", help="answer one prompt or a file of prompts with a tuned adapter",
                       description="Answer instructions with base model + adapter, prompted with the template "
                                   "the run was trained with; greedy unless --sample.")
    _common(g)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one instruction")
    src.add_argument("--file", help="prompts: .jsonl with 'instruction' (and optional 'context' or 'input') "
                                    "per line, or a text file with one instruction per line")
    g.add_argument("--context", default="", help="input/context for --prompt (the alpaca '### Input:' section)")
    _sampling(g)
    g.add_argument("--batch-size", type=int, default=8, help="prompts generated together (default 8)")
    g.add_argument("--out", default=None, help="write JSONL (instruction, context, response) here "
                                               "instead of printing the answers")

    c = sub.add_parser("chat", help="chat with a tuned adapter in the terminal (or a browser with --web)",
                       description="Multi-turn chat with base model + adapter, answers streamed as they are "
                                   "written. In the terminal: /reset starts over, /quit leaves. With --web: "
                                   "a page on http://HOST:PORT/.")
    _common(c)
    _sampling(c)
    c.add_argument("--web", action="store_true", help="serve the chat as a web page instead of the terminal")
    c.add_argument("--host", default="127.0.0.1", help="address to serve on with --web (default 127.0.0.1: "
                                                       "this machine only; the page has no login)")
    c.add_argument("--port", type=int, default=7860, help="port for --web (default 7860; 0 picks a free one)")

    e = sub.add_parser("export", help="merge the adapter into a standalone Hugging Face model directory",
                       description="Merge the LoRA adapter into the base weights (peft merge_and_unload) and "
                                   "save model + tokenizer to a new directory that "
                                   "AutoModelForCausalLM.from_pretrained(DIR) loads without peft.")
    _common(e, device_default="cpu")
    e.add_argument("--out", required=True, help="new (or empty) directory to write; never overwritten")
    e.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="dtype of the saved weights (default fp32; the merge itself is always fp32)")


# ---------------------------------------------------------------- shared

def _check_sampling(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise FeditError(f"--max-new-tokens {args.max_new_tokens}: must be at least 1")
    if args.sample and args.temperature <= 0:
        raise FeditError(f"--temperature {args.temperature}: must be > 0 with --sample (leave out --sample "
                         f"for greedy decoding)")
    if not 0 < args.top_p <= 1:
        raise FeditError(f"--top-p {args.top_p}: must be in (0, 1]")


def _load(args: argparse.Namespace, console):
    """(loaded model, AdapterInfo, template) for the adapter the user named."""
    from fedit.inference import describe_adapter, load_for_inference

    info = describe_adapter(args.adapter)
    template = args.template or info.template
    console.print(f"loading {args.model or info.model or 'the default model'} + adapter {info.adapter_dir} "
                  f"(template {template})", style="dim")
    loaded = load_for_inference(args.adapter, model=args.model, dtype=args.dtype, device=args.device)
    if template == "chat" and not getattr(loaded.tokenizer, "chat_template", None):
        raise FeditError("--template chat: this model's tokenizer has no chat template; use --template alpaca")
    if args.sample:
        import torch

        torch.manual_seed(args.seed)
    return loaded, info, template


# ---------------------------------------------------------------- generate

def read_prompts(path: str | Path) -> list[tuple[str, str]]:
    """(instruction, context) pairs from a .jsonl file or a text file with one instruction per line."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise FeditError(f"prompt file {path} does not exist; pass --file with a .jsonl file "
                         f"({{\"instruction\": ..., \"context\": ...}} per line) or a text file (one prompt a line)")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise FeditError(f"prompt file {path} is not UTF-8 text; save it as UTF-8") from None
    out: list[tuple[str, str]] = []
    jsonl = p.suffix.lower() in (".jsonl", ".json")
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not jsonl:
            out.append((line.strip(), ""))
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise FeditError(f"{path} line {n}: not JSON ({e.msg}); each line must be an object like "
                             f"{{\"instruction\": \"...\", \"context\": \"...\"}}") from None
        if isinstance(row, str):
            row = {"instruction": row}
        if not isinstance(row, dict) or not isinstance(row.get("instruction"), str) or not row["instruction"].strip():
            raise FeditError(f"{path} line {n}: no non-empty string 'instruction'; each line must be an object "
                             f"like {{\"instruction\": \"...\", \"context\": \"...\"}}")
        ctx = row.get("context", row.get("input", "")) or ""
        if not isinstance(ctx, str):
            raise FeditError(f"{path} line {n}: 'context' must be a string")
        out.append((row["instruction"].strip(), ctx.strip()))
    if not out:
        raise FeditError(f"prompt file {path} has no prompts; put one instruction per line")
    return out


def generate_cmd(args: argparse.Namespace, console) -> None:
    from fedit.checkpoint import atomic_write
    from fedit.data.prompts import prompt
    from fedit.inference import generate, stops

    _check_sampling(args)
    if args.batch_size < 1:
        raise FeditError(f"--batch-size {args.batch_size}: must be at least 1")
    if args.context and not args.prompt:
        raise FeditError("--context goes with --prompt; in a --file, put a 'context' field on each JSONL line")
    items = [(args.prompt, args.context)] if args.prompt is not None else read_prompts(args.file)
    if not items[0][0].strip():
        raise FeditError("--prompt is empty; pass the instruction to answer")
    loaded, info, template = _load(args, console)
    prompts = [prompt(i, c, template, loaded.tokenizer) for i, c in items]
    answers = generate(loaded, prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                       do_sample=args.sample, temperature=args.temperature, top_p=args.top_p,
                       stop=stops(template), add_special_tokens=template != "chat")
    if args.out:
        out = Path(args.out).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(out, "".join(json.dumps({"instruction": i, "context": c, "response": a}, ensure_ascii=False)
                                  + "\n" for (i, c), a in zip(items, answers)))
        console.print(f"wrote {len(answers)} answer(s) to {out}")
    elif len(items) == 1:
        print(answers[0])
    else:
        for n, ((i, c), a) in enumerate(zip(items, answers), 1):
            print(f"### {n}: {i}" + (f"\n(context: {c})" if c else "") + f"\n{a}\n")


# ---------------------------------------------------------------- chat

def make_chat(args: argparse.Namespace, console):
    from fedit.chat import Chat

    loaded, info, template = _load(args, console)
    model = args.model or info.model or "default model"
    return Chat(loaded, template=template, max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                temperature=args.temperature, top_p=args.top_p, max_prompt_tokens=max(info.cutoff_len or 512, 512),
                title="fedit chat", info={"adapter": str(info.adapter_dir), "model": model})


def chat_cmd(args: argparse.Namespace, console) -> None:
    from fedit import chat as chat_mod

    _check_sampling(args)
    if not args.web:
        c = make_chat(args, console)
        chat_mod.terminal_chat(c, banner=f"fedit chat: {c.info['model']} + {c.info['adapter']} "
                                         f"(template {c.template}, {'sampling' if c.do_sample else 'greedy'})")
        return
    if not 0 <= args.port <= 65535:
        raise FeditError(f"--port {args.port}: must be 0-65535")
    # Bind before loading the model: a busy port is reported at once, not after the load.
    server = chat_mod.make_server(chat_mod.Chat(loaded=None), args.host, args.port)
    try:
        server.chat = make_chat(args, console)
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            console.print(f"warning: serving on {args.host}: anyone who reaches this address can use the chat "
                          f"(there is no login); open it by IP address (http://<ip>:{args.port}/): host names are "
                          f"refused, so that another site's page cannot reach it by DNS rebinding")
    except BaseException:
        server.server_close()
        raise
    chat_mod.serve(server, on_ready=lambda url: console.print(f"fedit chat on {url} (Ctrl-C stops)"))


# ---------------------------------------------------------------- export

def export_cmd(args: argparse.Namespace, console) -> None:
    from fedit.export import check_out_dir, export
    from fedit.inference import describe_adapter

    info = describe_adapter(args.adapter)  # user errors first, before the slow part
    check_out_dir(Path(args.out).expanduser())
    console.print(f"merging {info.adapter_dir} into {args.model or info.model or 'the default model'} ...",
                  style="dim")
    out = export(args.adapter, args.out, model=args.model, dtype=args.dtype, device=args.device)
    console.print(f"wrote {out}/: a standalone model for AutoModelForCausalLM.from_pretrained({str(out)!r}) "
                  f"and AutoTokenizer.from_pretrained({str(out)!r}); prompt it with the template it was tuned "
                  f"with (recorded in {out / 'fedit_export.json'})")


COMMANDS = {"generate": generate_cmd, "chat": chat_cmd, "export": export_cmd}
