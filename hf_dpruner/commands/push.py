"""``hf-dpruner push``: upload a pruned checkpoint folder (weights, masks, config, tokenizer, card) in one commit."""

from __future__ import annotations

import argparse

from ..hub import push_folder_to_hub


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hf-dpruner push", description=__doc__)
    parser.add_argument("folder", help="Output folder of `hf-dpruner prune` (or of `save_pretrained`).")
    parser.add_argument("--repo-id", required=True, help="Hub repository, e.g. me/smollm2-med-50 (created if needed).")
    parser.add_argument("--private", action="store_true", default=None, help="Create the repository as private.")
    parser.add_argument("--revision", help="Branch to push to (created if needed). Default: main.")
    parser.add_argument("--commit-message", help="Default: 'Upload model pruned with <method> (<sparsity>)'.")
    parser.add_argument("--create-pr", action="store_true", help="Open a pull request instead of pushing.")
    parser.add_argument("--token", help="Hub token. Default: HF_TOKEN or the token of `hf auth login`.")
    parser.add_argument("--overwrite-card", action="store_true",
                        help="Replace a README.md that hf_dpruner did not write with the generated card.")
    args = parser.parse_args(argv)
    commit = push_folder_to_hub(
        args.folder, args.repo_id, private=args.private, revision=args.revision, commit_message=args.commit_message,
        token=args.token, create_pr=args.create_pr, overwrite_card=args.overwrite_card,
    )
    print(f"pushed: {commit.commit_url}")
    return 0
