"""A corpus of real code from the machine itself: every .py file of this Python installation (its standard
library and site-packages), one {"text": ...} jsonl line per distinct file, in path order.

    python bench/code_corpus.py --out code.jsonl
    python data/prepare.py --pretrain_path code.jsonl --vocab_size 32768 --out_dir data/prepared/code32k
    python bench/code_corpus.py --out code.jsonl --roots /usr /opt --extensions .py,.pyi,.h,.hpp,.cuh,.c,.cc,.cpp

An installation with torch and transformers holds a few hundred MB of source: about a hundred million
tokens at a 32k vocabulary, enough for a time-to-loss run that repeats little of its data; C and C++
headers (torch's, CUDA's) make a larger corpus for longer runs.
"""
import argparse
import hashlib
import json
import os
import sys
import sysconfig


def code_sources(roots, max_bytes: int, extensions=(".py",)):
    """(path, text) of every distinct file under roots whose name ends with one of extensions, in sorted path
    order. Files over max_bytes (generated tables, vendored bundles) and files that are not UTF-8 are left out."""
    seen, paths = set(), []
    for root in roots:
        for folder, dirs, files in os.walk(root):
            dirs.sort()
            paths += [os.path.join(folder, f) for f in sorted(files) if f.endswith(tuple(extensions))]
    for path in sorted(set(paths)):
        try:
            if os.path.getsize(path) > max_bytes:
                continue
            with open(path, "rb") as f:
                raw = f.read()
            text = raw.decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        digest = hashlib.sha256(raw).digest()
        if text.strip() and digest not in seen:
            seen.add(digest)
            yield path, text


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the jsonl file to write")
    p.add_argument("--roots", nargs="*", default=None,
                   help="folders to search (default: this Python's standard library and site-packages)")
    p.add_argument("--max_file_bytes", type=int, default=1 << 20)
    p.add_argument("--extensions", default=".py", help="file name endings, comma separated (default: %(default)s)")
    args = p.parse_args()
    paths = sysconfig.get_paths()
    roots = args.roots or sorted({paths["stdlib"], paths["purelib"], paths["platlib"]})
    n = size = 0
    with open(args.out, "w", encoding="utf-8") as f:
        for _, text in code_sources(roots, args.max_file_bytes, args.extensions.split(",")):
            f.write(json.dumps({"text": text}) + "\n")
            n, size = n + 1, size + len(text.encode("utf-8"))
    print(f"{args.out}: {n:,} files, {size / 1e6:,.1f} MB of {args.extensions} from {', '.join(roots)}", file=sys.stderr)


if __name__ == "__main__":
    main()
