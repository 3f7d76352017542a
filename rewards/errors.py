"""The two ways a reward can fail: while it is being loaded, and while it scores a population."""

from __future__ import annotations


class RewardLoadError(ValueError):
    """A reward spec that cannot be turned into a reward; the message says what to write instead.

    A ValueError, so the command line reports it as a user error rather than a traceback.
    """


class RewardError(RuntimeError):
    """A reward failed while scoring: which reward, which population member, which sample.

    `member` is the row of the N x P matrix (None when the failure is not tied to one member, for
    example a bad argument list) and `sample` the prompt index within the step (None when a whole
    call failed). Raised before any weight changes, so the trainer can fail the step and rerun it.
    """

    def __init__(self, message: str, *, reward: str, member: int | None = None, sample: int | None = None):
        self.reward, self.member, self.sample, self.detail = reward, member, sample, message
        where = "".join(
            part
            for part in (
                f" on member {member}" if member is not None else "",
                f", sample {sample}" if sample is not None else "",
            )
        )
        super().__init__(f"reward {reward!r} failed{where}: {message}")

    def __reduce__(self):
        # Keyword-only fields need an explicit recipe to survive pickling (process pools, Ray).
        return (_rebuild, (self.detail, self.reward, self.member, self.sample))


def _rebuild(detail, reward, member, sample):
    return RewardError(detail, reward=reward, member=member, sample=sample)
