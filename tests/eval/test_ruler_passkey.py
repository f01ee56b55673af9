"""The eval's `passkey` task is the training data's: prompt + answer is the training record's text."""

import numpy

from ttt_train.data.synthetic import TASKS as TRAINING_TASKS
from ttt_train.eval.ruler import passkey


def test_passkey_prompt_and_answer_are_the_training_text():
    for seed, n in ((0, 3), (5, 40), (9, 200)):
        record_seed = int(numpy.random.default_rng(seed).integers(2**31))
        context, query, answer = TRAINING_TASKS["passkey"][0](record_seed, n)
        prompt = passkey(numpy.random.default_rng(seed), n, setting=None)
        assert prompt.references == [answer]
        assert f"{prompt.body}{prompt.answer_prefix} {answer}" == f"{context}\n{query} {answer}"
