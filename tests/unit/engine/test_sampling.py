import pytest
import torch

from kvmesh.engine.sampling import SamplerRow, make_generator, sample
from kvmesh.errors import InvalidRequestError
from kvmesh.sampling import SamplingParams


def rows(params: SamplingParams, n: int = 1) -> list[SamplerRow]:
    return [SamplerRow(params, make_generator(params, torch.device("cpu"))) for _ in range(n)]


def test_greedy_takes_the_argmax() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 1.0]])
    tokens, logprobs = sample(logits, rows(SamplingParams(temperature=0.0), 2))
    assert tokens == [1, 0]
    assert logprobs == [None, None]


def test_top_k_1_is_greedy_whatever_the_temperature() -> None:
    logits = torch.randn(1, 50)
    params = SamplingParams(temperature=5.0, top_k=1, seed=3)
    assert sample(logits, rows(params))[0] == [int(logits.argmax())]


def test_top_p_keeps_only_the_nucleus() -> None:
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]]))
    params = SamplingParams(temperature=1.0, top_p=0.8, seed=0)
    row = rows(params)
    drawn = {sample(logits, row)[0][0] for _ in range(200)}
    assert drawn == {0, 1}


def test_a_seed_reproduces_the_draws() -> None:
    logits = torch.randn(1, 100)
    params = SamplingParams(temperature=1.0, seed=42)
    a, b = rows(params), rows(params)
    first = [sample(logits, a)[0][0] for _ in range(20)]
    second = [sample(logits, b)[0][0] for _ in range(20)]
    assert first == second
    assert len(set(first)) > 1


def test_logprobs_are_those_of_the_unscaled_distribution() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    params = SamplingParams(temperature=0.0, logprobs=True, top_logprobs=2)
    _, (lp,) = sample(logits, rows(params))
    expected = torch.log_softmax(logits[0], -1)
    assert lp is not None
    assert lp.token_id == 2
    assert lp.logprob == pytest.approx(float(expected[2]))
    assert [t for t, _ in lp.top] == [2, 1]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (SamplingParams(max_tokens=0), "max_tokens"),
        (SamplingParams(temperature=-0.5), "temperature"),
        (SamplingParams(top_p=0.0), "top_p"),
        (SamplingParams(top_k=-2), "top_k"),
        (SamplingParams(top_logprobs=-1), "top_logprobs"),
        (SamplingParams(stop=("",)), "stop strings"),
        (SamplingParams(stop_token_ids=(-1,)), "stop_token_ids"),
        (SamplingParams(stop=tuple("abcdefghijklmnopq")), "at most 16 stop strings"),
        (SamplingParams(stop=("x" * 257,)), "at most 256 characters"),
        (SamplingParams(stop_token_ids=tuple(range(1, 100)) * 3), "at most 256 stop_token_ids"),
    ],
)
def test_invalid_parameters_are_refused_with_a_message(
    params: SamplingParams, message: str
) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        params.validate(vocab_size=100)
