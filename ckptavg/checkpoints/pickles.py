"""Pickles read into records: a pickle interpreter that executes nothing.

A checkpoint's pickles (a `torch.save` archive's `data.pkl`, DCP's `.metadata`) are input from elsewhere.
`pickle.Unpickler` with an allow-list in `find_class` stops unknown code, but it still hands the pickle the
allowed objects themselves: a `BUILD` on an allowed class sets attributes on it for the whole process
(`torch.HalfStorage.dtype = torch.bfloat16`), a `REDUCE` of an allowed constructor allocates what the pickle
asks (`bytearray(3 * 10**9)`), and a memo index of 2**32 makes the C unpickler allocate its memo array.

So this interpreter never resolves a name to an object. A name (`GLOBAL`) becomes a `Name` record; calling it
(`REDUCE`, `NEWOBJ`) becomes a `Call` record of the name and its arguments; `BUILD` and the items a `dict` or
`list` subclass receives are stored on that record. Plain values (numbers, strings, bytes, tuples, lists,
dicts, sets) are built as themselves, each from bytes the pickle holds, so the pickle's size bounds the
work and the memory. The format modules then read the records by their own schema (`torchsave.py`,
`dcp.py`), which is where meaning is given, checked and bounded.

Only binary opcodes (protocol 2 and later, which `torch.save` and `pickle.dump` write) are read; the
text opcodes of protocols 0-1, the extension registry (`EXT*`) and out-of-band buffers are refused.
"""

from __future__ import annotations

import functools
import pickletools
import struct
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..errors import CorruptCheckpointError, UnsafeCheckpointError

# Tuples nest no deeper than this: hashing a tuple (a dict key, a set item) recurses in C without a
# recursion check, and a tuple nested 10**5 deep crashes the interpreter.
MAX_TUPLE_DEPTH = 32


@dataclass(frozen=True)
class Name:
    """A global the pickle named (`module.name`), never imported."""

    module: str
    name: str

    def __str__(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(eq=False)
class Call:
    """What the pickle asked to be made: `func(*args)` (`REDUCE`) or `func.__new__(func, *args)` (`NEWOBJ`),
    then given `state` (`BUILD`) and, for a `dict` or `list` subclass, `items` and `values`. Compared and
    hashed by identity, as the object it stands for would be."""

    func: Name
    args: tuple
    state: Any = None
    built: bool = False
    items: dict = field(default_factory=dict)
    values: list = field(default_factory=list)


class _Reader:
    """One pickle's interpreter: a stack, marks and a memo, as pickle's own, holding only values and records."""

    def __init__(self, data: bytes, where: str, names: Collection[tuple[str, str]] | None,
                 persistent: Callable[[Any], Any] | None, opcodes: Collection[str] | None = None,
                 hashable: Collection[tuple[str, str]] = ()) -> None:
        self.data, self.pos, self.where, self.persistent = bytes(data), 0, where, persistent
        self.names = names  # None: any name becomes a record; else the only ones allowed
        self.opcodes = opcodes  # None: every opcode this reader knows; else the only ones allowed
        self.hashable_names = hashable  # the names whose records may be dict keys or set items
        self.stack: list[Any] = []
        self.marks: list[int] = []
        self.fence = 0  # the stack's items below the last MARK are out of reach, as pickle's own reader has it
        self.memo: dict[int, Any] = {}
        self.depth: dict[int, tuple[int, tuple]] = {}  # id of each tuple built -> (how deep it nests, it)

    # -- reading the opcode stream --
    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise CorruptCheckpointError(f"{self.where}: its pickle is truncated (an argument of {n} bytes at "
                                         f"byte {self.pos} runs past its end)")
        chunk = self.data[self.pos:end]
        self.pos = end
        return chunk

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "little")

    def u1(self) -> int:
        self.pos += 1
        return self.data[self.pos - 1]  # (past the end: an IndexError, which `run` reports as truncation)

    def u4(self) -> int:
        value = _U4.unpack_from(self.data, self.pos)[0]  # (struct.error past the end)
        self.pos += 4
        return value

    def text(self, n: int, at: int | None = None) -> str:
        """The UTF-8 string of the next `n` bytes (from `at`, where the caller has read the length itself)."""
        if at is not None:
            self.pos = at
        try:
            return str(self.take(n), "utf-8")
        except UnicodeDecodeError:
            raise CorruptCheckpointError(f"{self.where}: its pickle holds a string that is not UTF-8") from None

    def pop(self) -> Any:
        if len(self.stack) <= self.fence:
            raise CorruptCheckpointError(f"{self.where}: its pickle reaches below a MARK")
        return self.stack.pop()  # (an empty stack: an IndexError, reported by `run`)

    def pop_mark(self) -> list[Any]:
        if not self.marks:
            raise CorruptCheckpointError(f"{self.where}: its pickle closes a MARK it never opened")
        at = self.marks.pop()
        self.fence = self.marks[-1] if self.marks else 0
        items = self.stack[at:]
        del self.stack[at:]
        return items

    def top(self) -> Any:
        if len(self.stack) <= self.fence:
            raise CorruptCheckpointError(f"{self.where}: its pickle reaches below a MARK")
        return self.stack[-1]

    def tuple_of(self, items: list[Any]) -> tuple:
        t = tuple(items)
        depth = 0
        for i in t:
            if type(i) is tuple:  # (a tuple not in `depth` holds no tuple: it is 1 deep)
                depth = max(depth, self.depth.get(id(i), (1,))[0])
        if depth:
            depth += 1
            if depth > MAX_TUPLE_DEPTH:
                raise CorruptCheckpointError(f"{self.where}: its pickle nests tuples deeper than {MAX_TUPLE_DEPTH}")
            self.depth[id(t)] = (depth, t)  # (kept alive, so that its id is never another's)
        return t

    def name(self, module: Any, name: Any) -> Name:
        if not isinstance(module, str) or not isinstance(name, str):
            raise CorruptCheckpointError(f"{self.where}: its pickle names a global that is not a string")
        if self.names is not None and (module, name) not in self.names:
            raise UnsafeCheckpointError(f"{self.where}: refusing to unpickle {module}.{name}: not one of the "
                                        f"classes this format holds")
        return Name(module, name)

    def call(self, func: Any, args: Any) -> Call:
        if not isinstance(func, Name):
            raise CorruptCheckpointError(f"{self.where}: its pickle calls a {type(func).__name__}, not a name")
        if not isinstance(args, tuple):
            raise CorruptCheckpointError(f"{self.where}: its pickle calls {func} with arguments that are not a "
                                         f"tuple")
        return Call(func, args)

    def hashable(self, key: Any) -> None:
        """Refuse a key that the object it stands for could not be: a record of anything but the names
        `hashable_names` allows (pickle would fail on an unhashable dataclass, where a record hashes by
        identity), looked for inside tuples too."""
        todo = [key]
        while todo:
            k = todo.pop()
            if isinstance(k, Call) and (k.func.module, k.func.name) not in self.hashable_names:
                raise CorruptCheckpointError(f"{self.where}: its pickle uses a {k.func} as a key")
            if type(k) is tuple:
                todo.extend(k)

    def setitems(self, target: Any, items: list[Any]) -> None:
        if len(items) % 2:
            raise CorruptCheckpointError(f"{self.where}: its pickle sets a key without a value")
        into = target.items if isinstance(target, Call) else target
        if not isinstance(into, dict):
            raise CorruptCheckpointError(f"{self.where}: its pickle sets items of a {type(target).__name__}")
        try:
            for k, v in zip(items[::2], items[1::2], strict=True):
                if not isinstance(k, (str, int)):
                    self.hashable(k)
                into[k] = v
        except TypeError:  # an unhashable key
            raise CorruptCheckpointError(f"{self.where}: its pickle uses an unhashable dict key") from None

    def append(self, target: Any, values: list[Any]) -> None:
        into = target.values if isinstance(target, Call) else target
        if not isinstance(into, list):
            raise CorruptCheckpointError(f"{self.where}: its pickle appends to a {type(target).__name__}")
        into.extend(values)

    def setlike(self, items: list[Any], kind: type) -> Any:
        for item in items:
            self.hashable(item)
        try:
            return kind(items)
        except TypeError:
            raise CorruptCheckpointError(f"{self.where}: its pickle puts an unhashable item in a set") from None

    def memo_put(self, index: int) -> None:
        self.memo[index] = self.top()

    def memo_get(self, index: int) -> None:
        self.stack.append(self.memo[index])  # (never stored: a KeyError, reported by `run`)

    # -- the opcodes (each a method named as in `pickletools`) --
    def PROTO(self) -> None:
        if self.u1() > 5:
            raise CorruptCheckpointError(f"{self.where}: its pickle says protocol {self.data[self.pos - 1]}, which "
                                         f"no pickle reader knows")

    def FRAME(self) -> None:  # a buffering hint (the data is all in memory), but one that must fit, as pickle says
        if self.pos + 8 + _U8.unpack_from(self.data, self.pos)[0] > len(self.data):
            raise CorruptCheckpointError(f"{self.where}: its pickle is truncated (a frame runs past its end)")
        self.take(8)

    def BININT(self) -> None:
        self.stack.append(int.from_bytes(self.take(4), "little", signed=True))

    def BININT1(self) -> None:
        self.stack.append(self.u1())

    def BININT2(self) -> None:
        self.stack.append(self.uint(2))

    def LONG1(self) -> None:
        self.stack.append(int.from_bytes(self.take(self.uint(1)), "little", signed=True))

    def LONG4(self) -> None:
        self.stack.append(int.from_bytes(self.take(self.uint(4)), "little", signed=True))

    def BINFLOAT(self) -> None:
        self.stack.append(struct.unpack(">d", self.take(8))[0])

    def NONE(self) -> None:
        self.stack.append(None)

    def NEWTRUE(self) -> None:
        self.stack.append(True)

    def NEWFALSE(self) -> None:
        self.stack.append(False)

    def SHORT_BINUNICODE(self) -> None:
        self.stack.append(self.text(self.u1()))

    def BINUNICODE(self) -> None:
        self.stack.append(self.text(self.u4()))

    def BINUNICODE8(self) -> None:
        self.stack.append(self.text(self.uint(8)))

    def SHORT_BINSTRING(self) -> None:  # (a Python 2 `str`, read as latin-1 as pickle's default does)
        self.stack.append(str(self.take(self.uint(1)), "latin-1"))

    def BINSTRING(self) -> None:
        self.stack.append(str(self.take(self.uint(4)), "latin-1"))

    def SHORT_BINBYTES(self) -> None:
        self.stack.append(bytes(self.take(self.uint(1))))

    def BINBYTES(self) -> None:
        self.stack.append(bytes(self.take(self.uint(4))))

    def BINBYTES8(self) -> None:
        self.stack.append(bytes(self.take(self.uint(8))))

    def BYTEARRAY8(self) -> None:
        self.stack.append(bytearray(self.take(self.uint(8))))

    def EMPTY_LIST(self) -> None:
        self.stack.append([])

    def EMPTY_DICT(self) -> None:
        self.stack.append({})

    def EMPTY_TUPLE(self) -> None:
        self.stack.append(())

    def EMPTY_SET(self) -> None:
        self.stack.append(set())

    def MARK(self) -> None:
        self.marks.append(len(self.stack))
        self.fence = len(self.stack)

    def POP_MARK(self) -> None:
        self.pop_mark()

    def POP(self) -> None:
        self.pop()

    def DUP(self) -> None:
        self.stack.append(self.top())

    def TUPLE(self) -> None:
        self.stack.append(self.tuple_of(self.pop_mark()))

    def TUPLE1(self) -> None:
        self.stack.append(self.tuple_of([self.pop()]))

    def TUPLE2(self) -> None:
        b, a = self.pop(), self.pop()
        self.stack.append(self.tuple_of([a, b]))

    def TUPLE3(self) -> None:
        c, b, a = self.pop(), self.pop(), self.pop()
        self.stack.append(self.tuple_of([a, b, c]))

    def LIST(self) -> None:
        self.stack.append(self.pop_mark())

    def DICT(self) -> None:
        items = self.pop_mark()
        self.stack.append({})
        self.setitems(self.stack[-1], items)

    def FROZENSET(self) -> None:
        self.stack.append(self.setlike(self.pop_mark(), frozenset))

    def APPEND(self) -> None:
        value = self.pop()
        self.append(self.top(), [value])

    def APPENDS(self) -> None:
        values = self.pop_mark()
        self.append(self.top(), values)

    def SETITEM(self) -> None:
        value, key = self.pop(), self.pop()
        self.setitems(self.top(), [key, value])

    def SETITEMS(self) -> None:
        items = self.pop_mark()
        self.setitems(self.top(), items)

    def ADDITEMS(self) -> None:
        items, target = self.pop_mark(), self.top()
        if not isinstance(target, set):
            raise CorruptCheckpointError(f"{self.where}: its pickle adds set items to a {type(target).__name__}")
        target.update(self.setlike(items, set))

    def BINGET(self) -> None:
        self.memo_get(self.u1())

    def LONG_BINGET(self) -> None:
        self.memo_get(self.u4())

    def BINPUT(self) -> None:
        self.memo_put(self.u1())

    def LONG_BINPUT(self) -> None:
        self.memo_put(self.u4())

    def MEMOIZE(self) -> None:
        self.memo_put(len(self.memo))

    def GLOBAL(self) -> None:
        module, name = self.line(), self.line()
        self.stack.append(self.name(module, name))

    def STACK_GLOBAL(self) -> None:
        name, module = self.pop(), self.pop()
        self.stack.append(self.name(module, name))

    def REDUCE(self) -> None:
        args, func = self.pop(), self.pop()
        self.stack.append(self.call(func, args))

    NEWOBJ = REDUCE  # (`cls.__new__(cls, *args)` and `func(*args)` are the same record: a name and its arguments)

    def NEWOBJ_EX(self) -> None:
        kwargs, args, cls = self.pop(), self.pop(), self.pop()
        if kwargs:
            raise CorruptCheckpointError(f"{self.where}: its pickle makes an object with keyword arguments")
        self.stack.append(self.call(cls, args))

    def BUILD(self) -> None:
        state = self.pop()
        target = self.top()
        if not isinstance(target, Call) or target.built:
            raise CorruptCheckpointError(f"{self.where}: its pickle sets the state of a "
                                         f"{type(target).__name__} (only of an object it made, once)")
        target.state, target.built = state, True

    def BINPERSID(self) -> None:
        pid = self.pop()
        if self.persistent is None:
            raise CorruptCheckpointError(f"{self.where}: its pickle holds a persistent id where none is expected")
        self.stack.append(self.persistent(pid))

    def line(self) -> str:
        """A newline-ended argument (GLOBAL's module and name)."""
        end = bytes(self.data[self.pos:self.pos + 1024]).find(b"\n")
        if end < 0:
            raise CorruptCheckpointError(f"{self.where}: its pickle names a global without ending the name")
        text = self.text(end)
        self.pos += 1
        return text

    def run(self) -> Any:
        """The object, at the first STOP opcode (`self.pos` is then just past it)."""
        data, end, stack, memo = self.data, len(self.data), self.stack, self.memo
        ops = _methods(None if self.opcodes is None else frozenset(self.opcodes))
        # the commonest opcodes are done here rather than called (half of a DCP metadata file is memo traffic)
        memoize, binget, long_binget, binput, binint1, short_binunicode = (
            code if code in ops else -1 for code in (0x94, 0x68, 0x6A, 0x71, 0x4B, 0x8C))
        try:
            while self.pos < end:
                pos = self.pos
                code = data[pos]
                self.pos = pos + 1
                if code == memoize:
                    memo[len(memo)] = stack[-1] if len(stack) > self.fence else self.top()
                elif code == binget:
                    stack.append(memo[data[pos + 1]])
                    self.pos = pos + 2
                elif code == long_binget:
                    stack.append(memo[_U4.unpack_from(data, pos + 1)[0]])
                    self.pos = pos + 5
                elif code == binput:
                    memo[data[pos + 1]] = stack[-1] if len(stack) > self.fence else self.top()
                    self.pos = pos + 2
                elif code == binint1:
                    stack.append(data[pos + 1])
                    self.pos = pos + 2
                elif code == short_binunicode:
                    stack.append(self.text(data[pos + 1], pos + 2))
                elif (op := ops.get(code)) is not None:
                    op(self)
                elif code == STOP:
                    if len(self.stack) != 1 or self.marks:
                        raise CorruptCheckpointError(f"{self.where}: its pickle stops with {len(self.stack)} items "
                                                     f"on its stack")
                    return self.stack[0]
                elif code in _REFUSED or code in _OPS:
                    raise CorruptCheckpointError(f"{self.where}: its pickle uses {_REFUSED.get(code) or _OPS[code]}, "
                                                 f"which {'this format' if code in _OPS else 'ckptavg'} does not read")
                else:
                    raise CorruptCheckpointError(f"{self.where}: its pickle holds an unknown opcode 0x{code:02x} "
                                                 f"at byte {self.pos - 1}")
        except IndexError:
            raise CorruptCheckpointError(f"{self.where}: its pickle reads past its end or an empty stack") from None
        except struct.error:
            raise CorruptCheckpointError(f"{self.where}: its pickle is truncated") from None
        except KeyError:
            raise CorruptCheckpointError(f"{self.where}: its pickle reads a memo entry it never stored") from None
        raise CorruptCheckpointError(f"{self.where}: its pickle ends without a STOP opcode")


STOP = ord(".")
# the opcodes read, by their byte (pickletools' table): every method above named as one
_OPS: dict[int, str] = {op.code.encode("latin-1")[0]: op.name for op in pickletools.opcodes
                        if hasattr(_Reader, op.name)}
_U4, _U8 = struct.Struct("<I"), struct.Struct("<Q")


@functools.lru_cache(maxsize=8)
def _methods(opcodes: frozenset[str] | None) -> dict[int, Callable[[_Reader], None]]:
    """The reader's method for each opcode allowed (None: every one it knows), by the opcode's byte."""
    return {code: getattr(_Reader, name) for code, name in _OPS.items() if opcodes is None or name in opcodes}
# the ones refused: text opcodes (protocols 0-1), the extension registry, out-of-band buffers
_REFUSED = {op.code.encode("latin-1")[0]: op.name for op in pickletools.opcodes
            if op.name not in ("STOP",) and not hasattr(_Reader, op.name)}


def read_pickle(data: bytes, where: str, *, names: Collection[tuple[str, str]] | None = None,
                persistent: Callable[[Any], Any] | None = None, opcodes: Collection[str] | None = None,
                hashable: Collection[tuple[str, str]] = ()) -> Any:
    """The object `data` describes, as plain values and records (`Name`, `Call`, and what `persistent`
    makes of each persistent id). `names`: the only globals allowed (any other is refused,
    `UnsafeCheckpointError`); None allows any, as a record. `opcodes`: the only opcodes allowed (by
    `pickletools`' names), where the format's own reader knows fewer. `hashable`: the names whose records may
    be dict keys or set items (the classes that are hashable). Every malformed pickle is a
    `CorruptCheckpointError` naming `where`."""
    reader = _Reader(data, where, names, persistent, opcodes, hashable)
    obj = reader.run()
    if reader.pos != len(reader.data):
        raise CorruptCheckpointError(f"{where}: its pickle has {len(reader.data) - reader.pos} bytes after its end")
    return obj


def read_pickle_at(data: bytes, start: int, where: str, *, names: Collection[tuple[str, str]] | None = None,
                   persistent: Callable[[Any], Any] | None = None,
                   opcodes: Collection[str] | None = None) -> tuple[Any, int]:
    """The object of the pickle that starts at `start` of `data` (one of several back to back), and where
    it ends."""
    reader = _Reader(data, where, names, persistent, opcodes)
    reader.pos = start
    return reader.run(), reader.pos


def walk(obj: Any) -> Iterator[Any]:
    """Every value reachable from `obj` through containers and records, each once, without recursion (a
    pickle nests as deep as its bytes allow)."""
    seen: set[int] = set()
    todo = [obj]
    while todo:
        value = todo.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        yield value
        if isinstance(value, dict):
            todo.extend(value.keys())
            todo.extend(value.values())
        elif isinstance(value, (list, tuple, set, frozenset)):
            todo.extend(value)
        elif isinstance(value, Call):
            todo.extend((value.args, value.state, value.items, value.values))
