"""nanoGPT-style configuration: defaults are plain globals in train.py, overridden by config files and flags.

    python train.py config/shakespeare_cpu.py --batch_size=8 --compile=False

Arguments are applied left to right: a path is a Python file whose top-level assignments override
the defaults, `--key=value` overrides one key (the value is read as a Python literal when it parses as
one, else as a string: --lora_targets='("q_proj","v_proj")' is a tuple, --lora_targets=c_attn a str).
Unlike nanoGPT's exec-into-globals, every name is checked: an unknown key is an error that suggests close
matches, and a value must have the default's type (an int may stand for a float; a default of None accepts
anything; a default of 'auto' also accepts True or False). Typos fail loudly instead of silently doing nothing.
"""
import ast
import difflib

from tools.errors import UserError


class ConfigTypeError(UserError, TypeError):
    """A config value of the wrong type: the user's to fix (one line), and a TypeError as before."""


CONFIG_TYPES = (int, float, bool, str, tuple, list, type(None))


def _check(key, value, defaults, source):
    if key not in defaults:
        close = difflib.get_close_matches(key, list(defaults), n=3)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        raise UserError(f"unknown config key {key!r} (from {source}).{hint}")
    default = defaults[key]
    if default is None or value is None:
        return value
    if default == "auto" and isinstance(value, bool):  # compile='auto' | True | False
        ok = True
    elif isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(value, bool) and isinstance(default, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float))
        value = float(value) if ok else value
    elif isinstance(default, (tuple, list)):
        ok = isinstance(value, (tuple, list, str))  # a str may be a regex (lora_targets)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigTypeError(f"config key {key!r} (from {source}) expects {type(default).__name__} like "
                        f"{default!r}, got {type(value).__name__} {value!r}")
    return value


def _parse_value(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word: a string such as --init_from=gpt2


def configure(defaults, argv):
    """Return {key: value} overrides for `defaults` from config files and --key=value flags in argv."""
    overrides = {}
    for arg in argv:
        if not arg.startswith("--"):
            if "=" in arg:
                raise UserError(f"argument {arg!r}: flags look like --key=value; a bare argument is a config file")
            try:
                with open(arg, encoding="utf-8") as f:
                    source = f.read()
                code = compile(source, arg, "exec")
            except FileNotFoundError:
                raise FileNotFoundError(f"config file {arg!r} not found (config files live in config/)") from None
            except IsADirectoryError:
                raise UserError(f"config file {arg!r} is a folder; a config file is a .py file of assignments "
                                 f"(flags look like --key=value)") from None
            except (UnicodeDecodeError, ValueError):  # ValueError: null bytes
                raise UserError(f"config file {arg!r} is not a text file; a config file is a .py file of "
                                 f"assignments like those in config/") from None
            except SyntaxError as e:
                raise UserError(f"config file {arg}, line {e.lineno}: {e.msg}; a config file is Python "
                                 f"assignments like those in config/") from None
            print(f"overriding config with {arg}")
            namespace = {}
            exec(code, {}, namespace)  # config files are trusted Python, as in nanoGPT
            for key, value in namespace.items():
                if key.startswith("_") or not isinstance(value, CONFIG_TYPES):
                    continue  # imports, helper functions and private names are not settings
                overrides[key] = _check(key, value, defaults, arg)
        else:
            key, sep, text = arg[2:].partition("=")
            if not sep:
                raise UserError(f"flag {arg!r}: expected --{key}=VALUE")
            value = _parse_value(text)
            if isinstance(defaults.get(key), float) and text.lower() in ("nan", "inf", "-inf"):
                value = float(text)  # a float all the same: validate.py says why it is not a valid one
            overrides[key] = _check(key, value, defaults, arg)
            print(f"overriding: {key} = {overrides[key]!r}")
    return overrides
