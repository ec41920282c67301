"""One exception type for every problem a user can fix.

Each error names the problem and the fix; the CLI prints it without a traceback and the app shows it
in an ``st.error`` box.
"""


class InfluenceLensError(Exception):
    """A problem with the user's input or environment, with a hint on how to fix it."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem}\n  Fix: {fix}")
