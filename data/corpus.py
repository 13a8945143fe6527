"""The embedded default corpus: stories about a small world, generated offline.

`build_corpus` returns pretraining stories, chat questions with one checkable
answer (SFT), and preference pairs (DPO), each with held-out splits, all drawn
deterministically from a seed. `answer_is_correct` grades a model's reply.

What the DPO pairs test: a style, not facts. Most SFT replies end with a needless
hedge ("Mia's kite is red, I think."): each of the three hedged forms is twice as
common as the plain reply, so SFT teaches the model to hedge. A DPO pair keeps
the correct value and prefers the plain reply to the same reply with a hedge. The
SFT model prefers the hedged one, so held-out preference accuracy starts near 0%
and rises only by what DPO teaches, while answer accuracy (both forms grade as
correct) shows what that costs in facts. Pairs that differ in the value would test
which value belongs to whom, which a model this small barely learns. The hedged
forms outnumber the plain one so that the SFT model's preference is one-sided:
with all four forms equally common it is a coin toss (bench/LOG.md).
"""
import hashlib
import functools
import random
import re

# ----------------------------------------------------------------------------
# The world. Within each category no value is a whole word of another value
# (so "Mill Creek" never hides a "Creek"), and no value is a word of another
# category that questions ask about; the grader relies on both.

PEOPLE = (
    "Mia", "Tom", "Ava", "Ben", "Lily", "Sam", "Emma", "Jack", "Noah", "Zoe",
    "Leo", "Ella", "Max", "Ruby", "Finn", "Lucy", "Owen", "Nora", "Eli", "Ivy",
    "Jake", "Maya", "Luke", "Anna", "Ryan", "Clara", "Adam", "Grace", "Liam", "Hazel",
    "Oscar", "Isla", "Henry", "Alice", "Theo", "Chloe", "Jonah", "Sara", "Felix", "Tess",
    "Hugo", "Nina", "Milo", "Julia", "Dan", "Kate", "Paul", "Rosa", "Carl", "Lena",
    "Omar", "Eva", "Sean", "Amy", "Ian", "Beth", "Kai", "Jill", "Ted", "Molly",
)
PLACES = (
    "Oakvale", "Brookfield", "Millbrook", "Ashford", "Riverton", "Elmwood", "Stonebury",
    "Fairhaven", "Maplewood", "Lakeside", "Westport", "Northwick", "Hillcrest", "Cloverdale",
    "Pinecrest", "Seabrook", "Thornbury", "Windmere", "Dunmore", "Kingsbridge", "Harrowgate",
    "Bellford", "Foxley", "Amberton", "Mill Creek", "Cedar Falls", "Pine Hollow", "Sandy Bay",
    "Old Harbor", "Elm Crossing",
)
OBJECTS = (
    "kite", "lamp", "boat", "ball", "hat", "bike", "drum", "cup", "book", "bag",
    "scarf", "coat", "kettle", "clock", "bell", "box", "sled", "wagon", "flute", "guitar",
    "tent", "chair", "rug", "vase", "bucket", "basket", "shovel", "ladder", "mug", "pen",
    "brush", "bowl", "pillow", "blanket", "jacket", "balloon", "teapot", "candle", "whistle", "rope",
)
COLOURS = (
    "red", "blue", "green", "yellow", "purple", "pink",
    "brown", "black", "white", "grey", "silver", "gold",
)
NUMBERS = (
    "two", "three", "four", "five", "six", "seven",
    "eight", "nine", "ten", "eleven", "twelve",
)
ANIMALS = ("dog", "cat", "rabbit", "parrot", "goat", "hen", "pony", "hamster", "turtle", "guinea pig")
ITEMS = (  # things people have a number of (plural)
    "apples", "pears", "plums", "eggs", "coins", "marbles",
    "shells", "cookies", "stamps", "buttons", "carrots", "lemons",
)
WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")

# Sentence templates. One fact per sentence, each naming its person, so a
# question about a fact is answerable from the story alone.
FACT_TEMPLATES = {
    "home": ("{p} lives in {place}.", "{p} has a house in {place}.", "{p} lives in the town of {place}."),
    "object": ("{p} has a {colour} {obj}.", "{p}'s {obj} is {colour}.", "{p} owns a {colour} {obj}."),
    "count": ("{p} has {n} {item}.", "{p} has {n} {item} at home.", "{p} keeps {n} {item} in a jar."),
    "age": ("{p} is {n} years old.", "{p} is {n}."),
    "pet": ("{p} has a pet {animal}.", "{p} keeps a {animal} as a pet.", "{p}'s pet is a {animal}."),
    "walk": (
        "One day {p} walked to {place} with {q}.",
        "On {day}, {p} and {q} walked to {place}.",
        "{p} and {q} walked to {place} together.",
    ),
}
# Fillers carry no value of any question category, so they never add a distractor.
SCENE_FILLERS = (
    "The day was sunny.", "It was a windy morning.", "It was cold outside.",
    "The morning was warm and bright.", "It rained a little in the afternoon.",
    "The streets were quiet.", "Spring had come early that year.",
)
PERSON_FILLERS = (
    "{p} laughed.", "{p} sang a song.", "{p} was happy.", "{p} likes to read.",
    "{p} is kind to everyone.", "{p} smiled.", "{p} told a funny story.",
)
WALK_FILLERS = (
    "They had a picnic by the river.", "They saw a parade in the square.",
    "They bought bread at the market.", "They sat under a big tree.",
    "They played games in the park.", "They stayed until the evening.",
)
PERSON_FACTS = ("home", "object", "count", "age", "pet")
# The rejected style of the DPO pairs: doubt about a fact the story states plainly ("Mia's kite is
# red, I think."). Short: the stories never use these words, so each costs several tokenizer
# pieces, and SFT's loss should stay mostly on the answers. None names a value of any category,
# so a hedged reply grades like the plain one.
HEDGES = ("I think", "I guess", "maybe")
PLAIN_SHARE = 1 / 7  # of SFT replies; each hedge gets 2/7, enough to outweigh the seed-to-seed noise

SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a careful reader. Answer with one short sentence.",
    "Answer questions about the story.",
)
USER_TEMPLATES = (
    "{story}\n\n{question}",
    "Read the story and answer the question.\n\nStory: {story}\n\nQuestion: {question}",
    "Here is a story:\n{story}\n\n{question}",
    "{story}\nQuestion: {question}\nAnswer in one sentence.",
)
# kind -> (question, assistant answer with {v} for the answer value, category choices)
QUESTIONS = {
    "colour": ("What colour is {p}'s {obj}?", "{p}'s {obj} is {v}.", COLOURS),
    "home": ("Where does {p} live?", "{p} lives in {v}.", PLACES),
    "count": ("How many {item} does {p} have?", "{p} has {v} {item}.", NUMBERS),
    "age": ("How old is {p}?", "{p} is {v} years old.", NUMBERS),
    "pet": ("What pet does {p} have?", "{p}'s pet is a {v}.", ANIMALS),
    "owner": ("Who has a {obj}?", "{v} has a {obj}.", PEOPLE),
    "companion": ("Who walked to {place} with {p}?", "{v} did.", PEOPLE),
    "destination": ("Where did {p} and {q} walk to?", "They walked to {v}.", PLACES),
}


# ----------------------------------------------------------------------------
# Grading

_NON_WORD = re.compile(r"[^0-9a-z]+")


def _words(text):
    return tuple(_NON_WORD.sub(" ", text.lower()).split())


@functools.lru_cache(maxsize=64)
def _phrase_table(choices):
    phrases = {w: c for c in choices if (w := _words(c))}
    return phrases, max((len(w) for w in phrases), default=0)


def _find_choices(text, choices):
    """Choices named in text, matching whole words, longest phrase first at each position."""
    phrases, longest = _phrase_table(frozenset(choices))
    words, found, i = _words(text), set(), 0
    while i < len(words):
        for n in range(min(longest, len(words) - i), 0, -1):
            hit = phrases.get(words[i:i + n])
            if hit is not None:
                found.add(hit)
                i += n
                break
        else:
            i += 1
    return found


def answer_is_correct(response: str, answer: str, choices: list[str]) -> bool:
    """True iff `answer` is named in `response` (whole words, any case/punctuation) and no other choice is."""
    found = _find_choices(response, set(choices) | {answer})
    return found == {answer}


# ----------------------------------------------------------------------------
# Stories

def _make_cast(rng, n_people):
    """n people with distinct values in every category, plus a walk destination that is nobody's home."""
    people = rng.sample(PEOPLE, n_people)
    places = rng.sample(PLACES, n_people + 1)
    colours, objects = rng.sample(COLOURS, n_people), rng.sample(OBJECTS, n_people)
    numbers = rng.sample(NUMBERS, 2 * n_people)  # counts and ages never repeat inside a story
    items, animals = rng.sample(ITEMS, n_people), rng.sample(ANIMALS, n_people)
    facts = {}
    for i, p in enumerate(people):
        facts[("home", p)] = dict(p=p, place=places[i])
        facts[("object", p)] = dict(p=p, colour=colours[i], obj=objects[i])
        facts[("count", p)] = dict(p=p, n=numbers[i], item=items[i])
        facts[("age", p)] = dict(p=p, n=numbers[n_people + i])
        facts[("pet", p)] = dict(p=p, animal=animals[i])
    walk = None
    if n_people >= 2:
        a, b = rng.sample(people, 2)
        walk = dict(p=a, q=b, place=places[-1], day=rng.choice(WEEKDAYS))
    return people, facts, walk


def _render(rng, people, facts, chosen, walk, n_fillers):
    """Person facts grouped by person (cast order), then the walk, then fillers."""
    sentences = []
    for p in people:
        for kind in PERSON_FACTS:
            if (kind, p) in chosen:
                sentences.append(rng.choice(FACT_TEMPLATES[kind]).format(**facts[(kind, p)]))
    if walk is not None:
        sentences.append(rng.choice(FACT_TEMPLATES["walk"]).format(**walk))
    used = set()
    while n_fillers > 0:
        r = rng.random()
        if walk is not None and r < 0.4:
            filler, at_start = rng.choice(WALK_FILLERS), False
        elif r < 0.7:
            filler, at_start = rng.choice(PERSON_FILLERS).format(p=rng.choice(people)), False
        else:
            filler, at_start = rng.choice(SCENE_FILLERS), True
        if filler in used:
            continue
        used.add(filler)
        sentences.insert(0, filler) if at_start else sentences.append(filler)
        n_fillers -= 1
    return " ".join(sentences)


def _pretrain_story(rng):
    """One story of 3-8 sentences whose facts are consistent with one cast."""
    n_people = rng.choice((1, 2, 2, 3, 3))
    people, facts, walk = _make_cast(rng, n_people)
    chosen = set()
    for p in people:
        for kind in rng.sample(PERSON_FACTS, rng.randint(1, 3)):
            chosen.add((kind, p))
    if walk is not None and rng.random() < 0.4:
        walk = None
    n_facts = len(chosen) + (walk is not None)
    while n_facts > 8:  # trim person facts, keeping at least one per person
        removable = [k for k in sorted(chosen) if sum(1 for c in chosen if c[1] == k[1]) > 1]
        chosen.remove(rng.choice(removable))
        n_facts -= 1
    target = rng.randint(max(3, n_facts), max(8, n_facts))
    # A closing sentence may repeat a home already stated, never introduce a new one.
    closing = walk is not None and ("home", walk["p"]) in chosen and n_facts < target and rng.random() < 0.5
    story = _render(rng, people, facts, chosen, walk, target - n_facts - closing)
    if closing:
        story += " At night {} went home to {}.".format(walk["p"], facts[("home", walk["p"])]["place"])
    return story


def _qa_item(rng):
    """A story and a question about it: (prompt msgs, plain reply, answer, choices)."""
    kind = rng.choice(tuple(QUESTIONS))
    n_people = 3 if kind == "companion" else rng.choice((2, 3))
    people, facts, walk = _make_cast(rng, n_people)
    target, other = people[0], people[1]
    fmt = {}
    if kind in PERSON_FACTS or kind in ("colour", "owner"):
        fact_kind = {"colour": "object", "owner": "object"}.get(kind, kind)
        required = {(fact_kind, target), (fact_kind, other)}  # the fact and a same-category distractor
        fmt.update(facts[(fact_kind, target)])
        answer = {"colour": fmt.get("colour"), "home": fmt.get("place"), "count": fmt.get("n"),
                  "age": fmt.get("n"), "pet": fmt.get("animal"), "owner": target}[kind]
        if rng.random() < 0.5:
            walk = None
    elif kind == "companion":
        third = next(p for p in people if p not in (walk["p"], walk["q"]))
        required = {(rng.choice(PERSON_FACTS), third)}
        fmt.update(walk)
        answer = walk["q"]
    else:  # destination: someone's home is a place that is not the answer
        required = {("home", rng.choice(people))}
        fmt.update(walk)
        answer = walk["place"]
    question_tpl, answer_tpl, choices = QUESTIONS[kind]
    # Extra facts about the cast, so the story is not only the facts being asked about.
    optional = [(k, p) for p in people for k in PERSON_FACTS if (k, p) not in required]
    n_extra = rng.randint(0, min(3, len(optional)))
    chosen = required | set(rng.sample(optional, n_extra))
    story = _render(rng, rng.sample(people, len(people)), facts, chosen, walk, rng.randint(0, 1))
    question = question_tpl.format(**fmt)
    user = rng.choice(USER_TEMPLATES).format(story=story, question=question)
    prompt = [{"role": "user", "content": user}]
    if rng.random() < 0.3:
        prompt.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    reply = answer_tpl.format(v=answer, **fmt)
    return prompt, reply, answer, list(choices)


def hedged(reply, hedge):
    """ "Mia's kite is red." -> "Mia's kite is red, I think." (every reply template ends with a period)"""
    return f"{reply[:-1]}, {hedge}."


def _sft_example(rng):
    prompt, reply, answer, choices = _qa_item(rng)
    content = reply if rng.random() < PLAIN_SHARE else hedged(reply, rng.choice(HEDGES))
    return {"conversations": prompt + [{"role": "assistant", "content": content}], "answer": answer,
            "choices": choices}


def _dpo_pair(rng):
    prompt, reply, answer, choices = _qa_item(rng)
    chosen = prompt + [{"role": "assistant", "content": reply}]
    rejected = [dict(m) for m in prompt] + [{"role": "assistant", "content": hedged(reply, rng.choice(HEDGES))}]
    return {"chosen": chosen, "rejected": rejected, "answer": answer, "choices": choices}


def _prompt_key(item):
    msgs = item["conversations"] if "conversations" in item else item["chosen"]
    return msgs[-2]["content"]  # the user turn that quotes the story and asks


def _draw(make, seed, name, n, exclude=(), key=lambda x: x):
    """n items from make(rng), rng seeded by (seed, name); items whose key is excluded or repeated are redrawn."""
    rng = random.Random(f"{seed}/{name}")
    seen, out = set(exclude), []
    for _ in range(50 * n + 1000):  # bounded: the world is far larger than any split
        if len(out) == n:
            break
        item = make(rng)
        k = key(item)
        if k in seen:
            continue
        seen.add(k)
        out.append(item)
    if len(out) < n:
        raise RuntimeError(f"corpus split {name!r}: only {len(out)} distinct items of {n} requested")
    return out


def build_corpus(seed: int = 1337, n_stories: int = 40000, n_sft: int = 20000, n_dpo: int = 10000,
                 n_eval: int = 500) -> dict:
    """Pretraining stories, SFT examples and DPO pairs with held-out splits, deterministic in `seed`."""
    n_val_stories = max(50, round(0.02 * n_stories))
    # Training stories may repeat (short stories can coincide); held-out ones never appear in train.
    rng = random.Random(f"{seed}/pretrain/train")
    train_stories = [_pretrain_story(rng) for _ in range(n_stories)]
    val_stories = _draw(_pretrain_story, seed, "pretrain/val", n_val_stories, exclude=train_stories)

    rng = random.Random(f"{seed}/sft/train")
    sft_train = [_sft_example(rng) for _ in range(n_sft)]
    rng = random.Random(f"{seed}/dpo/train")
    dpo_train = [_dpo_pair(rng) for _ in range(n_dpo)]
    # Held-out prompts are new to every training split and to each other.
    taken = {_prompt_key(x) for x in sft_train} | {_prompt_key(x) for x in dpo_train}
    splits = {}
    for name, make in (("sft", _sft_example), ("dpo", _dpo_pair)):
        for part in ("val", "test"):
            items = _draw(make, seed, f"{name}/{part}", n_eval, exclude=taken, key=_prompt_key)
            taken |= {_prompt_key(x) for x in items}
            splits[(name, part)] = items
    return {
        "pretrain": {"train": train_stories, "val": val_stories},
        "sft": {"train": sft_train, "val": splits[("sft", "val")], "test": splits[("sft", "test")]},
        "dpo": {"train": dpo_train, "val": splits[("dpo", "val")], "test": splits[("dpo", "test")]},
    }


def corpus_fingerprint() -> str:
    """A hash of this file's source, recorded in an embedded corpus's meta.json. Any edit to
    the generator changes it (a version number to bump by hand could be forgotten); a stale
    corpus costs a few seconds to regenerate, training on one costs a wrong result."""
    with open(__file__, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]
