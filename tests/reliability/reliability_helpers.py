"""Where tests/reliability/test_hostile.py still imports its helpers from: they live in tests/helpers.py.

Import them from there (`from helpers import small_job, ...`) and delete this file.
"""

from helpers import REPO, launcher_command, read_json_if_present, small_job, snapshot, subprocess_env  # noqa: F401
