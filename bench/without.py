"""Run a lorafit entry point with some of its sync-free pieces turned off: the "off" side of bench/throughput.py's
on/off pairs (`+off:mask_skip/indexed_lm_head`) and bench/loss_parity.py's reference side, whose loss then has none of
lorafit's fast-path code. The product has no switch for these: neither changes what is computed, so a user has no
reason to turn one off, and product code reads no benchmark switch.

    python bench/without.py mask_skip/indexed_lm_head src/train.py --recipe llama2_guanaco_fast --set ...

Pieces: mask_skip (lorafit.attention.skip_mask_building: transformers' packed-row detection and mask construction
run again), indexed_lm_head (lorafit.lm_head: TRL's own fused LM head scores the loss), dropout_grad_kernel
(lorafit.fused: the fused layers' dropout backward is torch's addcmul_ again, which the kernel matches bit for bit).
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PIECES = ("mask_skip", "indexed_lm_head", "dropout_grad_kernel")


def turn_off(pieces: list[str]) -> None:
    import lorafit.attention
    import lorafit.fused
    import lorafit.lm_head  # light modules: the patched names are looked up later, when src/train.py uses them

    unknown = sorted(set(pieces) - set(PIECES))
    if unknown:
        raise SystemExit(f"bench/without.py: unknown piece(s) {unknown}; known: {', '.join(PIECES)}")
    if "mask_skip" in pieces:
        lorafit.attention.skip_mask_building = lambda model: None
    if "indexed_lm_head" in pieces:
        lorafit.lm_head.install_indexed_lm_head = lambda causal_lm: False
    if "dropout_grad_kernel" in pieces:
        lorafit.fused._dropout_grad_add = lambda gx, t, mask, value: gx.addcmul_(t, mask, value=value)


def main() -> None:
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    sys.path.insert(0, str(REPO / "src"))
    turn_off([p for p in sys.argv[1].replace(",", "/").split("/") if p])
    script = sys.argv[2]
    sys.argv = sys.argv[2:]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
