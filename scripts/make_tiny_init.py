"""Write a from-scratch tiny VLM of a real architecture (random weights, locally built tokenizer) to a folder.

The CPU recipes start from such a folder (``model.init``), because nothing can be downloaded here:

    python scripts/make_tiny_init.py --arch smolvlm --out runs/tiny_init/smolvlm_256px \
        --tile-size 256 --longest-edge 256 --no-image-splitting      # tiny_cpu_sft, tiny_cpu_crop_set_sft
    python scripts/make_tiny_init.py --arch qwen25vl --out runs/tiny_init/qwen25vl

The builders are test support (``tests/tiny_models.py``), not part of the installed package; this script is
the one place that uses them outside the tests. The output is a ``save_pretrained`` folder that
``zoomvlm.targets.hf.load_vlm`` and TRL load like any checkpoint (so GRPO's KL reference loads from it too).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # tests/tiny_models.py


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=("smolvlm", "qwen25vl", "llava"), default="smolvlm")
    p.add_argument("--out", required=True, help="folder to write (created; an existing model there is replaced)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tile-size", type=int, default=256, help="SmolVLM: tile side in px (a multiple of 64)")
    p.add_argument("--longest-edge", type=int, default=512, help="SmolVLM: images are resized to this longest side")
    p.add_argument(
        "--image-splitting",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="SmolVLM: cut images into tiles + a global view (--no-image-splitting: global view only)",
    )
    args = p.parse_args(argv)

    import tiny_models

    if args.arch == "smolvlm":
        model, processor = tiny_models.build_tiny_smolvlm(args.seed, tile_size=args.tile_size,
                                                          longest_edge=args.longest_edge,
                                                          image_splitting=args.image_splitting)  # fmt: skip
    elif args.arch == "qwen25vl":
        model, processor = tiny_models.build_tiny_qwen25vl(args.seed)
    else:
        model, processor = tiny_models.build_tiny_llava(args.seed)
    print(tiny_models.save_tiny(model, processor, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
