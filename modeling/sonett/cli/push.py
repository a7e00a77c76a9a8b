"""Upload a saved Sonett folder to the Hugging Face Hub (or list what would be uploaded with --dry-run).

    sonett push runs/sonett-tiny your-name/sonett-tiny --private
    sonett push runs/sonett-tiny your-name/sonett-tiny --revision experiment --dry-run
    sonett push runs/chat-lora your-name/chat-lora --base_model your-name/sonett-tiny

It takes any folder save_pretrained writes: a text or vision model (with its tokenizer or processor), the merged
folder of `sonett finetune --merge`, or a PEFT adapter folder (adapter_config.json, adapter_model.safetensors). A
folder without a model card uploads one generated from its config and results (the folder itself is not changed).
An adapter's card names its base model's Hub id: when the adapter names its base by a local path, pass
--base_model OWNER/NAME. The token comes from HF_TOKEN or the saved `hf auth login`; HF_ENDPOINT selects another Hub.
The folder is checked first (config, finished safetensors weights, remote-code files) and refused with the fix if
incomplete.
Only what a model folder holds is uploaded (weights, configs, tokenizer, the sonett code files as installed, card,
results, plots); any other file, a credential file, a link or hard link that leads elsewhere, a token pasted into a
text file or an absolute local path refuses the push, naming each. --allow_extra_files PATTERN admits more files.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import logging as hf_logging

from sonett.cli.parsing import argument_parser
from sonett.hub.upload import CARD_FILE, FolderNotReadyError, NoHubTokenError, format_size, push_folder_to_hub


def build_parser() -> argparse.ArgumentParser:
    """The parser of `sonett push`."""
    parser = argument_parser("push", __doc__)
    parser.add_argument(
        "folder",
        help="a folder save_pretrained (or training) wrote: a text or vision model, a merged fine-tune, or a PEFT "
        "adapter; a missing model card is generated",
    )
    parser.add_argument("repo_id", help="owner/name on the Hub (or name, for your own namespace)")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--revision", default=None, help="branch to commit to; created from main if missing")
    parser.add_argument(
        "--commit_message", "--commit-message", default=None, help="commit title (default: 'Upload <folder name>')"
    )
    parser.add_argument(
        "--dry_run",
        "--dry-run",
        action="store_true",
        help="check the folder, list the files and write the model card as it would upload to a temporary file; "
        "uploads nothing and needs no token",
    )
    parser.add_argument(
        "--base_model",
        "--base-model",
        default=None,
        metavar="REPO_ID",
        help="the Hub id (owner/name) of the base model: required for an adapter saved from a local base model "
        "(the card and adapter_config.json then name it instead of the local path); for a merged fine-tune it "
        "fills the generated card's base_model",
    )
    parser.add_argument(
        "--allow_extra_files",
        "--allow-extra-files",
        action="append",
        default=[],
        metavar="PATTERN",
        help="also upload files matching this glob (path inside the folder, e.g. 'notes.md' or 'extra/*'); repeatable. "
        "Never admits credential files or .py files",
    )
    parser.add_argument(
        "--allow_modified_code",
        "--allow-modified-code",
        action="store_true",
        help="upload *_sonett.py files that differ from the installed sonett package (code your users will run)",
    )
    parser.add_argument("--verbose", action="store_true", help="log huggingface_hub's progress")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    hf_logging.disable_propagation()  # huggingface_hub prints through its own handler; avoid every line twice
    if args.verbose:
        logging.getLogger("sonett").setLevel(logging.INFO)
        if hf_logging.get_verbosity() > logging.INFO:
            hf_logging.set_verbosity_info()
    try:
        result = push_folder_to_hub(
            args.folder,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message,
            dry_run=args.dry_run,
            allow_extra_files=args.allow_extra_files,
            allow_modified_code=args.allow_modified_code,
            base_model=args.base_model,
        )
    except (FolderNotReadyError, NoHubTokenError, HfHubHTTPError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    visibility = "private" if result.private else "public"
    heading = "would upload" if result.dry_run else "uploaded"
    print(
        f"{heading} {len(result.files)} files ({format_size(result.total_bytes)}) to {result.repo_id}@{result.revision}"
    )
    for f in result.files:
        note = f"  ({'; '.join(f.changes)})" if f.changes else ""
        print(f"  {f.path_in_repo:<40} {format_size(f.size):>10}{note}")
    if result.dry_run:
        card = next((f for f in result.files if f.path_in_repo == CARD_FILE), None)
        if card is not None:
            copy = Path(tempfile.mkdtemp(prefix="sonett-push-")) / CARD_FILE
            copy.write_bytes(card.content if card.content is not None else card.local_path.read_bytes())
            print(f"model card as it would upload: {copy}")
        print(f"dry run: nothing was sent; the repository would be created {visibility} if missing")
        return 0
    revision = "" if result.revision == "main" else f', revision="{result.revision}"'
    print(f"commit {result.commit_oid}: {result.commit_url}")
    print(f'load it with AutoModelForCausalLM.from_pretrained("{result.repo_id}"{revision}, trust_remote_code=True)')
    return 0


if __name__ == "__main__":
    sys.exit(main())
