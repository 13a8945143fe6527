"""The embedded corpus: deterministic, disjoint splits, answerable questions, and a strict grader."""
import re

import pytest

from data.corpus import (ANIMALS, COLOURS, HEDGES, ITEMS, NUMBERS, OBJECTS, PEOPLE, PLACES, PLAIN_SHARE,
                         answer_is_correct, build_corpus, hedged)

SMALL = dict(seed=7, n_stories=1000, n_sft=600, n_dpo=400, n_eval=100)


@pytest.fixture(scope="module")
def corpus():
    return build_corpus(**SMALL)


def _names(text, value):
    return re.search(r"(?<!\w)" + re.escape(value) + r"(?!\w)", text) is not None


def _story(msgs):
    """The story quoted in the user turn: everything before the question line."""
    user = msgs[-2]["content"]
    assert msgs[-2]["role"] == "user"
    return user[:user.rfind("\n", 0, user.index("?"))]


def _examples(corpus):
    """(prompt msgs incl. final assistant, answer, choices) for every SFT example and DPO chosen side."""
    for split in corpus["sft"].values():
        for ex in split:
            yield ex["conversations"], ex["answer"], ex["choices"]
    for split in corpus["dpo"].values():
        for pair in split:
            yield pair["chosen"], pair["answer"], pair["choices"]


def test_same_seed_gives_identical_corpus(corpus):
    assert build_corpus(**SMALL) == corpus


def test_different_seed_gives_different_corpus(corpus):
    other = build_corpus(**{**SMALL, "seed": 8})
    for stage in ("pretrain", "sft", "dpo"):
        assert other[stage]["train"] != corpus[stage]["train"]
        assert other[stage]["val"] != corpus[stage]["val"]


def test_split_sizes_follow_the_arguments(corpus):
    assert len(corpus["pretrain"]["train"]) == 1000
    assert len(corpus["pretrain"]["val"]) == 50  # 2% of 1000 is 20, raised to the floor of 50
    assert len(build_corpus(n_stories=5000, n_sft=1, n_dpo=1, n_eval=1)["pretrain"]["val"]) == 100
    assert [len(corpus["sft"][s]) for s in ("train", "val", "test")] == [600, 100, 100]
    assert [len(corpus["dpo"][s]) for s in ("train", "val", "test")] == [400, 100, 100]


def test_pretraining_val_stories_are_not_in_train(corpus):
    assert not set(corpus["pretrain"]["val"]) & set(corpus["pretrain"]["train"])


def test_pretraining_stories_have_three_to_eight_sentences(corpus):
    counts = [s.count(".") for s in corpus["pretrain"]["train"]]
    assert min(counts) >= 3 and max(counts) <= 8
    assert len(set(counts)) == 6  # every length occurs


def test_sft_heldout_prompts_are_not_in_train_or_each_other(corpus):
    prompts = {s: {ex["conversations"][-2]["content"] for ex in corpus["sft"][s]} for s in ("train", "val", "test")}
    assert len(prompts["val"]) == len(prompts["test"]) == 100
    assert not prompts["val"] & prompts["train"]
    assert not prompts["test"] & prompts["train"]
    assert not prompts["val"] & prompts["test"]


def test_dpo_heldout_prompts_are_not_in_train(corpus):
    prompts = {s: {p["chosen"][-2]["content"] for p in corpus["dpo"][s]} for s in ("train", "val", "test")}
    assert not prompts["val"] & prompts["train"]
    assert not prompts["test"] & prompts["train"]
    assert not prompts["val"] & prompts["test"]


def test_answer_is_one_of_the_choices(corpus):
    for _, answer, choices in _examples(corpus):
        assert answer in choices


def test_answer_appears_in_the_quoted_story(corpus):
    for msgs, answer, _ in _examples(corpus):
        assert _names(_story(msgs), answer), (answer, msgs)


def test_story_holds_a_distractor_of_the_answer_category(corpus):
    for msgs, answer, choices in _examples(corpus):
        story = _story(msgs)
        assert any(_names(story, c) for c in choices if c != answer), (answer, story)


def test_questions_cover_several_categories(corpus):
    categories = {tuple(ex["choices"]) for ex in corpus["sft"]["train"]}
    assert categories == {COLOURS, PLACES, NUMBERS, ANIMALS, PEOPLE}
    lines = (line for ex in corpus["sft"]["train"] for line in ex["conversations"][-2]["content"].split("\n"))
    openings = {tuple(line.removeprefix("Question: ").split()[:2]) for line in lines if "?" in line}
    assert len(openings) >= 6  # "What colour", "Where does", "How many", "Who walked", ...


def test_sft_assistant_reply_passes_the_checker(corpus):
    for split in corpus["sft"].values():
        for ex in split:
            assert answer_is_correct(ex["conversations"][-1]["content"], ex["answer"], ex["choices"]), ex


def test_sft_replies_are_plain_or_hedged_and_each_hedge_is_more_common_than_plain(corpus):
    forms = {None: 0, **{h: 0 for h in HEDGES}}
    for ex in corpus["sft"]["train"]:
        reply = ex["conversations"][-1]["content"]
        forms[next((h for h in HEDGES if reply.endswith(f", {h}.")), None)] += 1
    plain = forms.pop(None)
    assert 0.75 * PLAIN_SHARE < plain / len(corpus["sft"]["train"]) < 1.25 * PLAIN_SHARE
    assert all(n > 1.5 * plain for n in forms.values()), (plain, forms)


def test_dpo_chosen_is_the_plain_reply_and_rejected_adds_a_hedge(corpus):
    for split in corpus["dpo"].values():
        for p in split:
            chosen, rejected = p["chosen"][-1]["content"], p["rejected"][-1]["content"]
            assert not any(chosen.endswith(f", {h}.") for h in HEDGES)
            assert rejected in {hedged(chosen, h) for h in HEDGES}, p


def test_dpo_chosen_and_rejected_both_pass_the_checker(corpus):
    for split in corpus["dpo"].values():
        for p in split:
            for side in ("chosen", "rejected"):
                assert answer_is_correct(p[side][-1]["content"], p["answer"], p["choices"]), p


def test_a_hedge_goes_before_the_final_period():
    assert hedged("Mia's kite is red.", "I think") == "Mia's kite is red, I think."
    assert hedged("Tom did.", "maybe") == "Tom did, maybe."


def test_hedges_name_no_value_of_any_category():
    for hedge in HEDGES:
        for category in (PEOPLE, PLACES, COLOURS, NUMBERS, ANIMALS, OBJECTS, ITEMS):
            assert not any(_names(hedge.lower(), c.lower()) for c in category), hedge


def test_dpo_chosen_and_rejected_share_the_prompt(corpus):
    for split in corpus["dpo"].values():
        for p in split:
            assert p["chosen"][:-1] == p["rejected"][:-1]
            assert p["chosen"][-1] != p["rejected"][-1]


def test_roles_are_known_and_conversations_end_with_the_assistant(corpus):
    convs = [ex["conversations"] for s in corpus["sft"].values() for ex in s]
    convs += [p[side] for s in corpus["dpo"].values() for p in s for side in ("chosen", "rejected")]
    for msgs in convs:
        assert {m["role"] for m in msgs} <= {"system", "user", "assistant"}
        assert [m["role"] for m in msgs][-2:] == ["user", "assistant"]
        assert all(m["role"] == "system" for m in msgs[:-2])
        assert all(isinstance(m["content"], str) and m["content"] for m in msgs)


def test_some_but_not_all_examples_have_a_system_turn(corpus):
    with_system = sum(ex["conversations"][0]["role"] == "system" for ex in corpus["sft"]["train"])
    assert 0 < with_system < len(corpus["sft"]["train"])


def test_no_choice_is_a_word_of_another_choice_in_its_category():
    for category in (PEOPLE, PLACES, COLOURS, NUMBERS, ANIMALS):
        assert len(set(category)) == len(category)
        for a in category:
            assert not any(a != b and _names(b.lower(), a.lower()) for b in category), a


def test_checker_accepts_the_answer_in_any_case_and_punctuation():
    assert answer_is_correct("Tom's boat is green.", "green", list(COLOURS))
    assert answer_is_correct("GREEN!", "green", list(COLOURS))
    assert answer_is_correct("it's green, I think", "green", list(COLOURS))
    assert answer_is_correct("Mia lives in oakvale", "Oakvale", list(PLACES))


def test_checker_rejects_a_wrong_answer():
    assert not answer_is_correct("Tom's boat is red.", "green", list(COLOURS))
    assert not answer_is_correct("I do not know.", "green", list(COLOURS))
    assert not answer_is_correct("", "green", list(COLOURS))


def test_checker_rejects_hedged_answers_naming_two_choices():
    assert not answer_is_correct("red or green", "green", list(COLOURS))
    assert not answer_is_correct("Tom's boat is green. No, blue.", "green", list(COLOURS))


def test_checker_needs_whole_words():
    assert not answer_is_correct("Tommy did.", "Tom", list(PEOPLE))
    assert not answer_is_correct("It is greenish.", "green", list(COLOURS))


def test_checker_matches_multi_word_answers_as_a_whole():
    assert answer_is_correct("Ruby lives in Mill Creek.", "Mill Creek", list(PLACES))
    assert answer_is_correct("ruby lives in mill-creek", "Mill Creek", list(PLACES))
    assert not answer_is_correct("Ruby lives in Mill.", "Mill Creek", list(PLACES))
    assert answer_is_correct("Mia has a guinea pig.", "guinea pig", list(ANIMALS))
    assert not answer_is_correct("Mia has a guinea pig.", "hen", list(ANIMALS))


def test_checker_prefers_the_longest_choice_when_one_contains_another():
    choices = ["Creek", "Mill Creek"]
    assert answer_is_correct("They went to Mill Creek.", "Mill Creek", choices)
    assert not answer_is_correct("They went to Mill Creek.", "Creek", choices)
    assert answer_is_correct("They went to the Creek.", "Creek", choices)


def test_default_pretraining_text_is_several_megabytes():
    stories = build_corpus(n_sft=1, n_dpo=1, n_eval=1)["pretrain"]["train"]
    assert len(stories) == 40000
    assert sum(len(s.encode()) for s in stories) >= 3_000_000
