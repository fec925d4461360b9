"""The roles a checkpoint can play, and the hooks a backend needs to serve each."""

import enum


class Role(str, enum.Enum):
    RESUME = "resume"
    FINAL = "final"

    def __str__(self) -> str:
        return self.value


# A backend type serves a role when it implements every hook listed for it.
ROLE_HOOKS: dict[Role, tuple[str, ...]] = {
    Role.RESUME: ("save_resume", "list_checkpoints", "read_manifest", "open_file", "prune"),
    Role.FINAL: ("publish_final",),
}

# Sharded resume checkpoints need these as well.
SHARDED_HOOKS: tuple[str, ...] = ("stage_sharded", "commit_sharded", "discard_sharded")
