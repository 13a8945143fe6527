"""An instruction set and a preference set built from a folder of plain-text books, for choosing the
SFT and DPO defaults on real English rather than on the embedded synthetic corpus.

    python bench/english_tasks.py --books BOOKS_DIR --out_dir data/prepared/english_tasks

Two tasks, each from a passage (a paragraph of 150-600 characters from the middle 90% of a book,
which skips the Project Gutenberg header and licence; at most --per_book of them per book):
  - which book: "Which of these books is this passage from?" with four titles to choose from; the
    reply names the book. These records carry "answer" and "choices", so the SFT script's answer
    accuracy grades them (sft_test.jsonl holds only this task).
  - continue: the passage's first half; the reply is its second half.
A preference pair asks the same question: chosen is the right reply, rejected a wrong title or
the second half of another passage. Books are split by passage, not by book: every book appears in
train, val and test, and no passage appears in two of them.
Writes sft_train/sft_val/sft_test.jsonl and dpo_train/dpo_val.jsonl.
"""
import argparse
import json
import os
import random
import re

MIN_CHARS, MAX_CHARS = 150, 600


def title_of(path, text):
    """The book's 'Title:' line (Project Gutenberg header), else the file name."""
    match = re.search(r"^Title:\s*(.+?)\s*$", text, re.MULTILINE)
    if match:
        return match.group(1)
    return os.path.splitext(os.path.basename(path))[0].replace("_", " ")


def passages(text):
    """Paragraphs of MIN_CHARS..MAX_CHARS characters, whitespace collapsed, from the middle 90%."""
    text = text.replace("\r\n", "\n").lstrip("\ufeff")
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
    start, end = len(paragraphs) // 20, len(paragraphs) - len(paragraphs) // 20
    return [p for p in paragraphs[start:end] if MIN_CHARS <= len(p) <= MAX_CHARS and p.count(" ") >= 20]


def halves(passage):
    """Split at the word boundary nearest the middle."""
    cut = passage.rfind(" ", 0, len(passage) // 2 + 1)
    return passage[:cut], passage[cut + 1:]


def which_book(rng, passage, title, titles):
    choices = rng.sample([t for t in titles if t != title], 3) + [title]
    rng.shuffle(choices)
    question = ("Which of these books is this passage from? " + "; ".join(choices) + ".\n\n" + passage)
    wrong = rng.choice([c for c in choices if c != title])
    return question, f"It is from {title}.", f"It is from {wrong}.", title, choices


def continuation(rng, passage, other):
    first, second = halves(passage)
    return f"Continue this passage:\n\n{first}", second, halves(other)[1]


def build(books, seed=0, per_book=1000, val_share=0.05, test_share=0.05):
    """{split name: records}: SFT conversations and DPO pairs (see the module docstring)."""
    rng = random.Random(seed)
    items = []  # (passage, title)
    titles = []
    for path in books:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        title = title_of(path, text)
        titles.append(title)
        found = passages(text)
        items += [(p, title) for p in rng.sample(found, min(per_book, len(found)))]
    if len(titles) < 4:
        raise SystemExit(f"need at least 4 books to offer four choices, found {len(titles)}")
    rng.shuffle(items)
    n_val, n_test = int(len(items) * val_share), int(len(items) * test_share)
    splits = {"val": items[:n_val], "test": items[n_val:n_val + n_test], "train": items[n_val + n_test:]}
    out = {}
    for split, part in splits.items():
        sft, dpo = [], []
        for i, (passage, title) in enumerate(part):
            user = lambda content: [{"role": "user", "content": content}]  # noqa: E731
            if split == "test" or i % 2 == 0:
                question, right, wrong, answer, choices = which_book(rng, passage, title, titles)
                sft.append({"conversations": user(question) + [{"role": "assistant", "content": right}],
                            "answer": answer, "choices": choices})
            else:
                question, right, wrong = continuation(rng, passage, part[(i + 1) % len(part)][0])
                sft.append({"conversations": user(question) + [{"role": "assistant", "content": right}]})
            dpo.append({"chosen": user(question) + [{"role": "assistant", "content": right}],
                        "rejected": user(question) + [{"role": "assistant", "content": wrong}]})
        out[f"sft_{split}"] = sft
        if split != "test":
            out[f"dpo_{split}"] = dpo
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--books", required=True, help="a folder of .txt books (four or more)")
    ap.add_argument("--out_dir", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--per_book", type=int, default=1000,
                    help="passages drawn from each book at most, so no book dominates (default: 1000)")
    args = ap.parse_args()
    books = sorted(os.path.join(args.books, f) for f in os.listdir(args.books) if f.endswith(".txt"))
    os.makedirs(args.out_dir, exist_ok=True)
    for name, records in build(books, args.seed, args.per_book).items():
        with open(os.path.join(args.out_dir, name + ".jsonl"), "w") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        print(f"{name}.jsonl: {len(records)} records")


if __name__ == "__main__":
    main()
