import os
import re

import pytest

from ckptkit import CheckpointManager, Config, ConfigError
from ckptkit.local import local_root


def base():
    return {
        "run_name": "exp-42",
        "backends": {"scratch": {"type": "local", "path": "./ckpts"}},
        "roles": {"resume": {"backends": ["scratch"], "every_n_steps": 100, "keep_last": 2},
                  "final": {"backends": ["scratch"], "dtype": "bfloat16"}},
    }


def test_from_dict_reads_every_key():
    cfg = Config.from_dict(base())
    assert cfg.run_name == "exp-42"
    assert cfg.resume.backends == ("scratch",)
    assert (cfg.resume.every_n_steps, cfg.resume.keep_last, cfg.resume.format) == (100, 2, "torch")
    assert cfg.final.dtype == "bfloat16"
    assert cfg.backends["scratch"].type == "local"
    assert cfg.backends["scratch"].options == {"path": "./ckpts"}


def test_from_file_matches_dict(tmp_path):
    path = tmp_path / "ckptkit.yaml"
    path.write_text(
        "run_name: exp-42\n"
        "backends:\n  scratch: {type: local, path: ./ckpts}\n"
        "roles:\n  resume: {backends: [scratch], every_n_steps: 100, keep_last: 2}\n"
        "  final: {backends: [scratch], dtype: bfloat16}\n"
    )
    from_file = Config.from_file(path)
    assert from_file.resume == Config.from_dict(base()).resume
    assert from_file.source == str(path)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c.update(checkpoints={}), "checkpoints: unknown key"),
        (lambda c: c["roles"]["resume"].update(keep_lst=3), "roles.resume.keep_lst: unknown key; did you mean 'keep_last'"),
        (lambda c: c["roles"]["resume"].update(keep_last=0), "roles.resume.keep_last: must be an integer >= 1"),
        (lambda c: c["roles"]["resume"].update(every_n_steps=True), "roles.resume.every_n_steps"),
        (lambda c: c["roles"]["resume"].update(backends=[]), "roles.resume.backends: a role needs at least one backend"),
        (lambda c: c["roles"]["final"].update(backends=["nope"]), "roles.final.backends: 'nope' is not declared"),
        (lambda c: c["roles"]["resume"].update(format="pickle"), "roles.resume.format: must be one of torch, dcp"),
        (lambda c: c["roles"]["final"].update(dtype="int8"), "roles.final.dtype"),
        (lambda c: c["roles"]["resume"].update({"async": True, "async_copy": "later"}),
         "roles.resume.async_copy: must be one of blocking, optimizer_state, background, got 'later'"),
        (lambda c: c["roles"]["resume"].update(async_copy="background"),
         "roles.resume.async_copy: background applies to asynchronous saves; set async: true"),
        (lambda c: c["roles"].update(best={"backends": ["scratch"]}), "roles.best: unknown key"),
        (lambda c: c.update(roles={}), "roles: declare at least one role"),
        (lambda c: c.update(backends={}), "backends: declare at least one backend"),
        (lambda c: c["backends"]["scratch"].pop("type"), "backends.scratch.type: required key is missing"),
        (lambda c: c["backends"]["scratch"].update(type=5),
         "backends.scratch.type: must be the name of a backend type (e.g. type: local), got 5"),
        (lambda c: c["roles"]["resume"].update(format="dcp", **{"async": True}),
         "roles.resume.async: asynchronous saving works with format: torch"),
        (lambda c: c.update(run_name="../escape"), "run_name: '../escape' is not a valid run name"),
        (lambda c: c.update(run_name="a/b"), "run_name"),
        (lambda c: c.update(run_name="exp\n"), "run_name: 'exp\\n' is not a valid run name"),
    ],
)
def test_bad_config_names_the_key(mutate, message):
    cfg = base()
    mutate(cfg)
    with pytest.raises(ConfigError) as info:
        Config.from_dict(cfg)
    assert message in str(info.value)


def test_yaml_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("backends: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        Config.from_file(path)
    with pytest.raises(ConfigError, match="missing.yaml: config file not found"):
        Config.from_file(tmp_path / "missing.yaml")
    text = "backends: {a: {type: local, path: x}}\nroles: {resume: {backends: [a]}}\n"
    with pytest.raises(ConfigError, match=r"^the config given is text of several lines, not the path of a config "
                                          r"file: .*yaml.safe_load\(text\)") as caught:
        Config.load(text)  # what CheckpointManager.from_config(text) reads
    assert "backends" not in str(caught.value)
    long_text = text + "".join(f"# {'x' * 70}\n" for _ in range(5))  # longer than a file name may be
    with pytest.raises(ConfigError, match=r"^the config given is text of several lines"):
        Config.load(long_text)
    path.write_text("backends: {a: {type: local, path: x}}\nroles: {resume: {backends: [a], keep_last: -1}}\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: roles.resume.keep_last"):
        Config.from_file(path)



def test_config_file_errors_are_one_line_and_name_the_file_once(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("backends: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        Config.from_file(path)
    assert "\n" not in str(info.value)
    path.write_text("")
    with pytest.raises(ConfigError) as info:
        Config.from_file(path)
    assert str(info.value).count("bad.yaml") == 1
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    with pytest.raises(ConfigError, match="folder.yaml: cannot read the config file"):
        Config.from_file(folder)

@pytest.mark.parametrize(
    "options, message",
    [
        ({"type": "s3", "path": "s3://bucket/x"}, "backends.scratch.type: unknown backend type 's3' (installed: local"),
        ({"type": "local", "path": "s3://bucket/x"}, "backends.scratch.path: 's3://bucket/x' is a s3:// URI"),
        ({"type": "local", "path": "file://host/x"}, "backends.scratch.path: malformed file URI"),
        ({"type": "local", "path": "${SCRATCH}/ckpts"}, "backends.scratch.path: '${SCRATCH}/ckpts' holds ${SCRATCH}, "
                                                        "which ckptkit does not expand (only ~ is)"),
        ({"type": "local", "path": "/data/${USER}/ckpts"}, "backends.scratch.path: '/data/${USER}/ckpts' holds ${USER}"),
        ({"type": "local"}, "backends.scratch.path: required key is missing"),
        ({"type": "local", "path": "x", "pth": 1}, "backends.scratch.pth: unknown key"),
        ({"type": "local", "path": "x", "leftover_grace_s": -1}, "backends.scratch.leftover_grace_s"),
    ],
)
def test_backend_errors_come_before_training(options, message, pm, in_tmp):
    cfg = base()
    cfg["backends"]["scratch"] = options
    with pytest.raises(ConfigError) as info:
        CheckpointManager.from_config(cfg, plugin_manager=pm)
    assert message in str(info.value)
    assert not os.listdir(in_tmp), "a rejected config must not create anything"


def test_unknown_documented_type_gives_install_hint(pm):
    import importlib.metadata

    cfg = base()
    cfg["backends"]["registry"] = {"type": "mlflow"}
    cfg["roles"]["final"]["backends"] = ["registry"]
    # ``pm`` loads only ckptkit's own types: where ckptkit-mlflow is installed, the error says
    # that autoloading is off rather than suggesting to install what is there.
    installed = importlib.metadata.entry_points(group="ckptkit.backends", name="mlflow")
    expected = (r"ckptkit-mlflow \S+ declares it, but loading installed plugins is switched off" if installed
                else r'pip install "ckptkit\[mlflow\]"')
    with pytest.raises(ConfigError, match=expected):
        CheckpointManager.from_config(cfg, plugin_manager=pm)


@pytest.mark.parametrize("name", ["../../etc", "exp\n", ""])
def test_run_name_argument_is_checked_too(pm, name):
    """A trailing newline passed a check that ended in '$'; an empty name (--run-name "$UNSET")
    was taken for the config's own."""
    with pytest.raises(ConfigError, match="run_name"):
        CheckpointManager.from_config(base(), run_name=name, plugin_manager=pm)


@pytest.mark.parametrize("name", ["step-0000000005", "final", "final-2"])
def test_a_run_name_shaped_like_a_folder_ckptkit_writes_in_a_run_is_refused(pm, tmp_path, name):
    """Under a backend root that was another run's folder, such a run was taken for that run's
    checkpoint: its save of step 5 replaced the whole run with its own, and its prune deleted a
    final-shaped one once idle for the grace period, without a word."""
    cfg = base()
    cfg["backends"]["scratch"] = {"type": "local", "path": str(tmp_path / "root" / "alice")}
    with pytest.raises(ConfigError, match=f"run_name: '{name}' is the name of a folder ckptkit writes inside a run"):
        CheckpointManager.from_config(cfg, run_name=name, plugin_manager=pm)
    with pytest.raises(ConfigError, match="is the name of a folder ckptkit writes"):
        CheckpointManager.from_config({**cfg, "run_name": name}, plugin_manager=pm)
    assert not (tmp_path / "root").exists()
    for near in ("step-5", "step-0000000005a", "finals", "final-v2", "final_2"):
        CheckpointManager.from_config(cfg, run_name=near, plugin_manager=pm).close()


@pytest.mark.parametrize(
    "given, expected",
    [
        ("ckpts", "{cwd}/ckpts"),
        ("./ckpts", "{cwd}/ckpts"),
        ("/abs/ckpts", "/abs/ckpts"),
        ("file:///abs/ckpts", "/abs/ckpts"),
        ("file://localhost/abs/ckpts", "/abs/ckpts"),
        ("file://./ckpts", "{cwd}/ckpts"),
        ("file:ckpts", "{cwd}/ckpts"),
    ],
)
def test_local_path_forms(given, expected, in_tmp):
    assert local_root(given, "k") == expected.format(cwd=os.getcwd())


def test_distributed_timeout_is_checked_and_fingerprints_name_keys_not_values():
    from ckptkit.config import Config

    base = {"backends": {"a": {"type": "local", "path": "/secret/x"}}, "roles": {"resume": {"backends": ["a"]}}}
    assert Config.from_dict(base).distributed.timeout_s == 600
    assert Config.from_dict({**base, "distributed": {"timeout_s": 5}}).distributed.timeout_s == 5
    with pytest.raises(ConfigError, match=r"distributed.timeout_s: must be a number >= 1"):
        Config.from_dict({**base, "distributed": {"timeout_s": 0}})
    with pytest.raises(ConfigError, match=r"distributed"):
        Config.from_dict({**base, "distributed": {"timeout": 5}})
    one = Config.from_dict(base).fingerprint()
    other = Config.from_dict({**base, "roles": {"resume": {"backends": ["a"], "every_n_steps": 7}}}).fingerprint()
    assert {k for k in one if one[k] != other.get(k)} == {"roles.resume.every_n_steps"}
    assert "/secret/x" not in repr(one)


def test_fingerprints_are_the_same_for_equal_configs_holding_objects_and_sets():
    from ckptkit.config import Config

    def config():
        cfg = Config.from_dict({"backends": {"a": {"type": "local", "path": "p"}},
                                "roles": {"resume": {"backends": ["a"]}}})
        spec = cfg.backends["a"]
        # what a config built in code may hold: a client object, a set (repr differs per process)
        options = {**spec.options, "client": object(), "tags": {"x", "y", "z"}}
        return Config(backends={"a": type(spec)(name=spec.name, type=spec.type, options=options)}, resume=cfg.resume)

    assert config().fingerprint() == config().fingerprint()


def test_a_key_given_twice_in_the_config_file_is_refused_naming_it_and_its_lines(tmp_path):
    """PyYAML keeps the last of two equal keys: a second ``roles:`` block silently dropped the
    first one's resume role, and ``ckptkit check`` said the config was OK."""
    path = tmp_path / "twice.yaml"
    path.write_text("roles:\n  resume: {backends: [s], every_n_steps: 1, keep_last: 1}\n"
                    "backends:\n  s: {type: local, path: /tmp/x}\n"
                    "roles:\n  final: {backends: [s]}\n")
    with pytest.raises(ConfigError, match=r"twice.yaml: not valid YAML: the key 'roles' is given twice in one "
                                          r"mapping \(lines 1 and 5\)"):
        Config.load(str(path))
    # A merge key's base is overridden by the keys beside it, as YAML means it to be.
    path.write_text("backends:\n  s: &base {type: local, path: /tmp/x}\n  t:\n    <<: *base\n    path: /tmp/y\n"
                    "roles:\n  resume: {backends: [s, t], every_n_steps: 1, keep_last: 1}\n")
    assert Config.load(str(path)).backends["t"].options["path"] == "/tmp/y"
    # Also where the base, deeper than the mapping merging it (so merged before it is read
    # itself), merges another and overrides one of its keys.
    import yaml

    from ckptkit.config import _UniqueKeyLoader

    text = "top:\n  inner: &b1\n    <<: {type: local, path: /a}\n    path: /b\nt:\n  <<: *b1\n  path: /c\n"
    assert yaml.load(text, Loader=_UniqueKeyLoader) == {"top": {"inner": {"type": "local", "path": "/b"}},
                                                        "t": {"type": "local", "path": "/c"}}


@pytest.mark.parametrize("written, kind", [("42", "an int"), ("1.10", "a float"), ("0x1F", "an int"),
                                           ("yes", "a bool"), ("2024-01-05", "a date")])
def test_a_run_name_yaml_reads_as_no_string_says_to_quote_it_as_written(tmp_path, written, kind):
    """YAML reads run_name: 1.10 as 1.1 and 0x1F as 31: quoting the value it made would name
    another run, so the hint names none."""
    path = tmp_path / "c.yaml"
    path.write_text(f"run_name: {written}\nbackends: {{a: {{type: local, path: x}}}}\nroles: {{resume: {{backends: [a]}}}}\n")
    with pytest.raises(ConfigError, match=rf"run_name: YAML read it as {kind}, not a name; quote it as written"):
        Config.load(str(path))


def test_a_backends_own_option_error_names_the_config_file_too(tmp_path):
    """Errors in what a backend type reads (its options) came without the file's name, which
    the config's own errors give: a job reading several configs could not tell which."""
    path = tmp_path / "nopath.yaml"
    path.write_text("backends:\n  s: {type: local}\nroles:\n  resume: {backends: [s]}\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: backends.s.path: required key is missing"):
        CheckpointManager.from_config(str(path))


_LAUGHS = "".join(f"  - &l{i} [{', '.join([f'*l{i - 1}'] * 9) if i else ', '.join(['lol'] * 9)}]\n" for i in range(10))


@pytest.mark.parametrize("where", ["algorithm", "path"])
def test_yaml_aliases_standing_for_billions_of_values_are_refused_before_any_walk(tmp_path, where):
    """Ten lines of aliases nesting each other stand for 3.5 billion strings: ``ckptkit check``
    ran out of memory building the error message's repr of them, or never ended."""
    path = tmp_path / "bomb.yaml"
    laughs = "\n" + _LAUGHS.rstrip("\n")
    path.write_text(f"run_name: exp\nalgorithm: {laughs if where == 'algorithm' else 'sft'}\n"
                    "roles:\n  resume: {backends: [s]}\nbackends:\n  s:\n    type: local\n"
                    f"    path: {laughs.replace(chr(10), chr(10) + '    ') if where == 'path' else '/tmp/x'}\n")
    with pytest.raises(ConfigError, match=r"bomb.yaml: holds more than 100000 values once its YAML aliases"):
        Config.load(str(path))
    path.write_text("a: &a [1, *a]\n")  # a list that holds itself: endless
    with pytest.raises(ConfigError, match="more than 100000 values"):
        Config.load(str(path))
    # A few anchors and merge keys, as configs use them, are fine.
    path.write_text("backends:\n  s: &base {type: local, path: /tmp/x}\n  t:\n    <<: *base\n    path: /tmp/y\n"
                    "roles:\n  resume: {backends: [s, t], every_n_steps: 1, keep_last: 1}\n")
    assert Config.load(str(path)).backends["t"].options["path"] == "/tmp/y"


@pytest.mark.parametrize("second", ["./ckpts/", "./sub/../ckpts", "file://./ckpts", "./linked"])
def test_two_resume_backends_in_one_folder_are_refused(second, pm, in_tmp):
    """Each looked like a second copy of every checkpoint, and was the same copy."""
    os.makedirs("ckpts")
    os.makedirs("sub")
    os.symlink("ckpts", "linked")
    cfg = base()
    cfg["backends"]["again"] = {"type": "local", "path": second}
    cfg["roles"]["resume"]["backends"] = ["scratch", "again"]
    with pytest.raises(ConfigError) as info:
        CheckpointManager.from_config(cfg, plugin_manager=pm)
    assert str(info.value).startswith(f"backends 'scratch' and 'again' both keep resume checkpoints in one place "
                                      f"(file://{os.path.realpath('.')}/ckpts)"), info.value
    assert sorted(os.listdir(in_tmp)) == ["ckpts", "linked", "sub"] and not os.listdir("ckpts")


def test_the_local_backend_and_a_plugin_over_the_same_folder_are_refused(pm, in_tmp):
    """A third-party backend over fsspec's local filesystem, pointed at the local backend's folder:
    not refused, and each save wrote its files over the other's, losing committed steps while the
    error said they were committed."""
    import fsspec

    from ckptkit.storage import FileBackend

    class FsspecBackend(FileBackend):
        OPTIONS = ("path",)

        @classmethod
        def from_config(cls, name, options):
            return cls(name, fsspec.filesystem("file"), options["path"])

    pm.add_backend_type("fsfile", FsspecBackend)
    os.makedirs("ckpts")
    cfg = base()
    cfg["backends"]["again"] = {"type": "fsfile", "path": os.path.abspath("ckpts")}
    cfg["roles"]["resume"]["backends"] = ["scratch", "again"]
    with pytest.raises(ConfigError, match=r"backends 'scratch' and 'again' both keep resume checkpoints in one place"):
        CheckpointManager.from_config(cfg, plugin_manager=pm)
    cfg["backends"]["again"]["path"] = os.path.abspath("elsewhere")
    CheckpointManager.from_config(cfg, plugin_manager=pm).close()


def test_resume_backends_in_other_folders_and_a_final_one_beside_them_are_kept_apart(pm, in_tmp):
    cfg = base()
    cfg["backends"]["again"] = {"type": "local", "path": "./ckpts/nested"}
    cfg["roles"]["resume"]["backends"] = ["scratch", "again"]  # final on scratch's folder too, as base() has it
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    ck.close()


def test_resume_backends_on_one_path_of_two_hosts_are_kept_apart(pm, in_tmp):
    """A filesystem made with its host as a positional argument (fsspec keeps it apart from the
    options): the same folder on two servers is two places."""
    import fsspec

    from ckptkit.storage import FileBackend

    class HostFileSystem(fsspec.AbstractFileSystem):
        protocol = "hostfs"

        def __init__(self, host, **options):
            super().__init__(host, **options)

    class HostBackend(FileBackend):
        OPTIONS = ("host", "path")

        @classmethod
        def from_config(cls, name, options):
            return cls(name, HostFileSystem(options["host"], skip_instance_cache=True), options["path"])

    pm.add_backend_type("hostfs", HostBackend)
    cfg = base()
    cfg["backends"] = {"a": {"type": "hostfs", "host": "one.example", "path": "/ckpts"},
                       "b": {"type": "hostfs", "host": "two.example", "path": "/ckpts"}}
    cfg["roles"] = {"resume": {"backends": ["a", "b"]}}
    CheckpointManager.from_config(cfg, plugin_manager=pm).close()
    cfg["backends"]["b"]["host"] = "one.example"
    with pytest.raises(ConfigError, match="backends 'a' and 'b' both keep resume checkpoints in one place"):
        CheckpointManager.from_config(cfg, plugin_manager=pm)


def test_a_dollar_in_a_folder_name_is_kept(tmp_path, pm):
    """Only ${VAR} is refused: "$recycle" and "price$usd" are folder names."""
    cfg = base()
    cfg["backends"]["scratch"] = {"type": "local", "path": str(tmp_path / "price$usd")}
    ck = CheckpointManager.from_config(cfg, plugin_manager=pm)
    assert ck.router.instances["scratch"].root == str(tmp_path / "price$usd")
    ck.close()


def test_a_dollar_name_the_environment_holds_is_refused(tmp_path, pm, monkeypatch):
    """$SCRATCH/ckpts, meant to be expanded, made a folder named $SCRATCH under the working
    directory; $recycle, which the environment does not hold, is a folder's name."""
    monkeypatch.setenv("SCRATCH", str(tmp_path / "fast"))
    monkeypatch.delenv("recycle", raising=False)
    cfg = base()
    cfg["backends"]["scratch"] = {"type": "local", "path": "$SCRATCH/ckpts"}
    with pytest.raises(ConfigError, match=r"backends.scratch.path: '\$SCRATCH/ckpts' holds \$SCRATCH, which ckptkit "
                                          r"does not expand"):
        CheckpointManager.from_config(cfg, plugin_manager=pm)
    cfg["backends"]["scratch"]["path"] = str(tmp_path / "$recycle")
    CheckpointManager.from_config(cfg, plugin_manager=pm).close()
