"""Publish a pruned checkpoint on the Hugging Face Hub with its masks, pruning config and generated model card.

    hf-dpruner prune --domain medical --sparsity 0.5 --output-dir out/smollm2-med-50
    hf-dpruner eval out/smollm2-med-50                    # optional: puts the perplexities into the card
    python examples/push_to_hub.py out/smollm2-med-50 --repo-id me/smollm2-med-50 --dry-run
    python examples/push_to_hub.py out/smollm2-med-50 --repo-id me/smollm2-med-50   # needs `hf auth login`

The checkpoint is loaded with its masks first, which checks that every pruned weight is zero and that the masks
match the weights. `--dry-run` writes the card and lists what would be uploaded, without network.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from huggingface_hub import ModelCard
from huggingface_hub.utils import filter_repo_objects

from hf_dpruner import AutoPrunedModelForCausalLM
from hf_dpruner.hub import UPLOAD_IGNORE, push_folder_to_hub
from hf_dpruner.model_card import write_model_card


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="A pruned checkpoint folder.")
    parser.add_argument("--repo-id", required=True)
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--dry-run", action="store_true", help="Write the card and list the files; upload nothing.")
    args = parser.parse_args()

    model = AutoPrunedModelForCausalLM.from_pretrained(args.folder)  # raises if weights and masks disagree
    print(f"{args.folder}: {model.pruning_sparsity()['overall']:.1%} of the targeted weights pruned")

    if args.dry_run:
        write_model_card(args.folder, repo_id=args.repo_id)
        files = sorted(str(p.relative_to(args.folder)) for p in args.folder.rglob("*") if p.is_file())
        print("would upload, in one commit:", *filter_repo_objects(files, ignore_patterns=UPLOAD_IGNORE), sep="\n  ")
        card = ModelCard.load(args.folder / "README.md")
        print("card metadata:", card.data.to_dict())
        return
    commit = push_folder_to_hub(args.folder, args.repo_id, private=args.private or None)
    print(f"pushed: {commit.commit_url}")


if __name__ == "__main__":
    main()
