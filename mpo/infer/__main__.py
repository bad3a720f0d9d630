"""Generate answers from an InternVL checkpoint (native or AWQ) on the command line.

    python -m mpo.infer MODEL_DIR --prompt "What is in the picture?" --image cat.png
    python -m mpo.infer MODEL_DIR --prompt "Solve 2+2" --temperature 0.8 --num-samples 4 --seed 1
    python -m mpo.infer MODEL_DIR --prompt "Hi" --backend hf --json

With --temperature 0 (the default) decoding is greedy and the text equals `transformers` greedy
`generate` on the same checkpoint and inputs. One answer is printed as is; several are printed
under `### sample i` headers; --json prints a JSON list of {text, token_ids, logprobs, finished}.
"""

from __future__ import annotations

import argparse
import json
import sys

from mpo.infer.engine import BACKENDS, Engine, Request, SamplingParams


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mpo.infer", description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="native or AWQ InternVL checkpoint directory")
    parser.add_argument("--prompt", required=True, help="the user's question (<image> marks where images go)")
    parser.add_argument("--image", action="append", default=[], metavar="PATH", help="an image (repeatable)")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="new tokens at most (default 512)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass (1 = off)")
    parser.add_argument("--num-samples", type=int, default=1, help="answers to generate (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--max-dynamic-patch", type=int, default=6, help="tiles per image at most (default 6)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="default: cuda if present")
    parser.add_argument("--dtype", default=None, help="bf16 / fp16 / fp32 (default: bf16 on cuda, fp32 on cpu)")
    parser.add_argument("--backend", choices=BACKENDS, default="fast", help="generation backend (default fast)")
    parser.add_argument("--system-prompt", default=None, help="system turn (default: InternVL2.5's)")
    parser.add_argument("--json", action="store_true", help="print JSON with token ids and log-probs")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                top_p=args.top_p, num_samples=args.num_samples, seed=args.seed)
        kwargs = {} if args.system_prompt is None else {"system_prompt": args.system_prompt}
        engine = Engine.load(args.model_dir, device=args.device, dtype=args.dtype, backend=args.backend, **kwargs)
        request = Request(args.prompt, images=list(args.image), max_dynamic_patch=args.max_dynamic_patch)
        samples = engine.generate([request], params)[0]
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    if args.json:
        print(json.dumps([{"text": g.text, "token_ids": g.token_ids, "logprobs": g.logprobs, "finished": g.finished}
                          for g in samples], ensure_ascii=False))
    elif len(samples) == 1:
        print(samples[0].text)
    else:
        for i, g in enumerate(samples):
            print(f"### sample {i + 1}")
            print(g.text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
