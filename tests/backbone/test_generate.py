"""Completions (vtrans.backbone.generate): the labels every estimator is judged on."""

from __future__ import annotations

import pytest
import torch

from vtrans.backbone.generate import Completion, complete, is_correct, word_token_count
from vtrans.backbone.loading import Backbone
from vtrans.data import first_word, word_is_final

PROMPTS = ["Complete the idiom: a piece of", "Complete the idiom: kill two birds with one", "Complete the idiom: break the"]


@pytest.fixture(scope="module")
def gpt2() -> Backbone:
    backbone = Backbone("tiny-gpt2")
    assert backbone.model.config.n_layer == 4  # the tiny config, not a full GPT-2
    return backbone


def test_greedy_is_deterministic_and_starts_with_the_argmax(gpt2):
    first = complete(gpt2.model, gpt2.tokenizer, PROMPTS, max_new_tokens=4)
    again = complete(gpt2.model, gpt2.tokenizer, PROMPTS, max_new_tokens=4, batch_size=1)  # other padding
    assert first == again
    for prompt, completion in zip(PROMPTS, first, strict=True):
        ids = gpt2.tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            argmax = int(gpt2.model(input_ids=ids).logits[0, -1].argmax())
        assert completion.first_token == argmax
        assert completion.word_ids[0] == argmax
        assert completion.text == gpt2.tokenizer.decode(
            gpt2.tokenizer(completion.text, add_special_tokens=False)["input_ids"]
        )


def test_sampling_with_a_seed_is_reproducible_and_leaves_the_global_rng_alone(gpt2):
    state = torch.random.get_rng_state()
    a = complete(gpt2.model, gpt2.tokenizer, PROMPTS, do_sample=True, temperature=1.0, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = complete(gpt2.model, gpt2.tokenizer, PROMPTS, do_sample=True, temperature=1.0, seed=7)
    c = complete(gpt2.model, gpt2.tokenizer, PROMPTS, do_sample=True, temperature=1.0, seed=8)
    assert a == b
    # a random tiny model is close to uniform over 50k tokens: another seed gives other tokens
    assert [x.first_token for x in a] != [x.first_token for x in c]


def test_word_token_count_on_a_multi_token_word(gpt2):
    tok = gpt2.tokenizer
    word_ids = tok(" unbelievableness", add_special_tokens=False)["input_ids"]
    assert len(word_ids) >= 3  # really several tokens
    ids = word_ids + tok(". And then", add_special_tokens=False)["input_ids"]
    assert word_token_count(tok, ids, "unbelievableness") == len(word_ids)
    # a prefix of the word that is itself a word does not stop the count early
    cakes = tok(" cakes!", add_special_tokens=False)["input_ids"]
    assert word_token_count(tok, cakes, "cakes") == len(tok(" cakes", add_special_tokens=False)["input_ids"])
    assert word_token_count(tok, ids, "") == 1


def test_multi_token_completion_keeps_the_whole_word(gpt2):
    for completion in complete(gpt2.model, gpt2.tokenizer, PROMPTS, max_new_tokens=6):
        if not completion.word:
            continue
        decoded = gpt2.tokenizer.decode(list(completion.word_ids))
        assert completion.word in decoded.lower()
        shorter = gpt2.tokenizer.decode(list(completion.word_ids[:-1]))
        assert completion.word not in shorter.lower().split()


@pytest.mark.parametrize(
    ("text", "target", "expected"),
    [
        (" Cake.", "cake", True),
        (" cake", "Cake.", True),
        ("\n  CAKE and more", "cake", True),
        (" Don’t stop", "don't", True),  # curly apostrophe
        (" cakes", "cake", False),
        (" cake", "cakes", False),
        (" ...", "cake", False),  # no word at all
        ("", "cake", False),
    ],
)
def test_is_correct_normalises_both_sides(text, target, expected):
    from vtrans.data import first_word

    completion = Completion(text=text, word=first_word(text), first_token=0, word_ids=(0,))
    assert is_correct(completion, target) is expected


# --------------------------------------------------------------------------- tokens that are not text


@pytest.fixture(scope="module")
def gemma3_with_image_token():
    """A tiny Gemma 3 whose tokenizer has ``<start_of_image>`` (id 50257) as an ordinary token, as
    Gemma 3's does, and whose head has two rows past the tokenizer's vocabulary (50258, 50259)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from vtrans.backbone.files import gpt2_tokenizer
    from vtrans.backbone.random_weights import TINY

    kw = dict(TINY["tiny-gemma3"], vocab_size=50260)
    config = AutoConfig.for_model(kw.pop("model_type"), bos_token_id=50256, eos_token_id=50256, **kw)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    tokenizer = gpt2_tokenizer()
    tokenizer.add_tokens(["<start_of_image>"])  # not special: decoding keeps it, as Gemma 3's GGUF tokenizer does
    assert model.config.num_hidden_layers == 4 and len(tokenizer) == 50258
    return Backbone.from_model(model, tokenizer)


def _forced(model, token: int):
    """Within the context the model's logits put ``token`` far ahead of every other one."""
    from vtrans.backbone.architectures import unembedding

    def hook(module, args, output):
        output[..., token] += 1e4
        return output

    return unembedding(model).register_forward_hook(hook)


@pytest.mark.parametrize("token", [50257, 50259], ids=["start_of_image", "past-the-tokenizer"])
def test_a_token_that_is_not_text_is_never_generated_even_as_the_argmax(gemma3_with_image_token, token):
    from vtrans.backbone.architectures import non_text_ids
    from vtrans.backbone.generate import generate_batch

    backbone = gemma3_with_image_token
    model, tokenizer = backbone.model, backbone.tokenizer
    assert non_text_ids(model, tokenizer) == [50257, 50258, 50259]
    handle = _forced(model, token)
    try:
        completions, generation = generate_batch(model, tokenizer, PROMPTS, max_new_tokens=4, logits=True)
        sampled = complete(model, tokenizer, PROMPTS, max_new_tokens=4, do_sample=True, seed=3)
    finally:
        handle.remove()
    assert (generation.logits.argmax(-1) == token).all()  # the logits kept are the model's own: it wanted the token
    width = generation.prompt_width
    for completion in [*completions, *sampled]:
        assert token not in completion.word_ids and completion.first_token != token
        assert "<start_of_image>" not in completion.text
    assert not (generation.sequences[:, width:] >= 50257).any()


def test_a_family_without_non_text_tokens_suppresses_nothing_that_its_tokenizer_writes(gpt2):
    from vtrans.backbone.architectures import non_text_ids

    assert non_text_ids(gpt2.model, gpt2.tokenizer) == []


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-gemma3", "tiny-gpt-neox"])
def test_copies_draw_what_the_repeated_prompts_draw(name):
    """Each prompt's tokens run once and their keys and values shared by its copies: the same draws
    as the prompts repeated, across families (absolute positions, rotary, sliding windows). The
    tokens are compared exactly: both runs sample from the same seeded stream, and their logits
    differ only by float32 rounding between batch shapes (~1e-7), far from flipping a draw here."""
    backbone = Backbone(name)
    prompts = [*PROMPTS, "Complete the idiom: a"]  # widths differ: left padding
    k = 3
    repeated = complete(backbone.model, backbone.tokenizer, [p for p in prompts for _ in range(k)], do_sample=True,
                        seed=11, batch_size=len(prompts) * k)
    shared = complete(backbone.model, backbone.tokenizer, prompts, do_sample=True, seed=11, batch_size=len(prompts),
                      copies=k)
    assert shared == repeated
    words = complete(backbone.model, backbone.tokenizer, prompts, do_sample=True, seed=11, batch_size=len(prompts),
                     copies=k, words_only=True)
    assert [c.word for c in words] == [c.word for c in repeated]
    assert [c.first_token for c in words] == [c.first_token for c in repeated]


@pytest.mark.parametrize(
    ("text", "final"),
    [
        (" cake", False),  # the word may go on
        (" cake.", True),
        (" cake and", True),
        (" ca\ufffd", False),  # an unfinished character inside the word
        (" cake\ufffd", False),  # ... or right after it (it may be a letter)
        (" 90%", False),  # no word yet
        ("...\n", False),
        (" don't", False),
        (" don't ", True),
        ("", False),
    ],
)
def test_a_word_is_final_once_something_that_is_no_word_follows_it(text, final):
    assert word_is_final(text) is final
    if final:  # whatever comes after cannot change the word
        assert first_word(text + "x\ufffdyz q") == first_word(text)


@pytest.mark.parametrize(("name", "temperature"), [("tiny-gpt2", 1.0), ("tiny-llama", 0.7), ("tiny-gemma3", 1.3)])
def test_the_sample_tree_draws_what_generate_draws_running_each_distinct_prefix_once(name, temperature):
    """Sampled copies run one row per distinct prefix (vtrans.backbone.sample_tree) and draw
    ``generate``'s tokens: compared exactly, since both draw from the same seeded stream, one
    ``multinomial`` over the same (rows x vocabulary) shape a step, and their logits differ only
    by float32 rounding between batch sizes (~1e-7), far from moving a draw here. tiny-gemma3
    suppresses its image tokens, and a temperature other than 1 divides the logits."""
    backbone = Backbone(name)
    model, tokenizer = backbone.model, backbone.tokenizer
    prompts = [*PROMPTS, "Complete the idiom: a"]
    rows: list[int] = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, args, out: rows.append(out.shape[0] * out.shape[1]))
    runs = {}
    try:
        for tree in (True, False):
            rows.clear()
            runs[tree] = complete(model, tokenizer, prompts, max_new_tokens=5, do_sample=True, temperature=temperature,
                                  seed=3, batch_size=len(prompts), copies=8, words_only=True, tree=tree), sum(rows)
    finally:
        hook.remove()
    (tree, tree_tokens), (generated, generate_tokens) = runs[True], runs[False]
    assert [(c.word, c.first_token, c.word_ids) for c in tree] == [(c.word, c.first_token, c.word_ids) for c in generated]
    assert tree_tokens < generate_tokens  # the tokens fed: shared prefixes and finished rows run no more


def test_a_generation_setting_the_sample_tree_does_not_apply_leaves_the_draws_to_generate(gpt2):
    from vtrans.backbone import sample_tree

    config = gpt2.model.generation_config
    assert sample_tree.applies(gpt2.model)
    saved = config.repetition_penalty
    config.repetition_penalty = 1.3  # a logits processor of generate's own
    try:
        assert not sample_tree.applies(gpt2.model)
        penalised = complete(gpt2.model, gpt2.tokenizer, PROMPTS, do_sample=True, seed=5, copies=4, words_only=True)
        looped = complete(gpt2.model, gpt2.tokenizer, PROMPTS, do_sample=True, seed=5, copies=4, words_only=True, tree=False)
    finally:
        config.repetition_penalty = saved
    assert penalised == looped  # generate drew both: the penalty applies to each
