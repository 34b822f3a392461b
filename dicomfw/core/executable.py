"""Is a value the start of an executable? PE, ELF, Mach-O and script files (``#!/``).

A DICOM value is a file's carrier of choice (OB, OW, UN, UT, LT can hold anything; PS3.10
§7.5 even lets a PE header sit in the preamble, CVE-2019-11687): the firewall refuses a value
that *starts* like an executable. Each test is the one the loader itself applies, so that
real images, whose pixel values are arbitrary, never trip it (pydicom's test files and 10,000
random 16-bit buffers pass, ``tests/test_core_content.py``):

* PE (Microsoft PE/COFF §3): "MZ", then ``e_lfanew`` (32-bit LE at 0x3C) pointing at
  "PE\\0\\0" inside the first ``HEAD_BYTES`` of the value (4-byte aligned, past the DOS
  header). Two random bytes are "MZ" once in 65,536 values; the signature adds 2^-32.
* ELF (System V ABI, e_ident): "\\x7fELF", EI_CLASS 1 or 2, EI_DATA 1 or 2, EI_VERSION 1.
* Mach-O (<mach-o/loader.h>): a thin magic (FEEDFACE/FEEDFACF, either byte order) with a known
  CPU type and a file type of 1-12; or the fat magic CAFEBABE with 1-16 architectures whose
  first has a known CPU type (Java class files share CAFEBABE but have a version >= 45 there).
* Script: "#!/" then printable path characters (and spaces, tabs) up to a newline within the
  first 256 bytes, as execve(2) reads an interpreter line.
"""

from __future__ import annotations

from typing import Final

#: How much of a value the check looks at: the walker holds this much of each opaque value.
HEAD_BYTES: Final = 4096
_SCRIPT_LINE: Final = 256
_SCRIPT_BYTES: Final = bytes(range(0x20, 0x7F)) + b"\t"
#: Mach-O CPU types (<mach/machine.h>): x86, x86_64, ARM, ARM64, ARM64_32, PowerPC(64).
_CPU_TYPES: Final = frozenset((7, 0x01000007, 12, 0x0100000C, 0x0200000C, 18, 0x01000012))


def _u32(head: bytes, at: int, little: bool) -> int:
    return int.from_bytes(head[at : at + 4], "little" if little else "big")


def _pe(head: bytes) -> bool:
    if len(head) < 0x40 or head[:2] != b"MZ":
        return False
    lfanew = _u32(head, 0x3C, True)
    return 0x40 <= lfanew <= len(head) - 4 and head[lfanew : lfanew + 4] == b"PE\x00\x00"


def _elf(head: bytes) -> bool:
    return (
        len(head) >= 16
        and head[:4] == b"\x7fELF"
        and head[4] in (1, 2)
        and head[5] in (1, 2)
        and head[6] == 1
    )


def _macho(head: bytes) -> bool:
    if len(head) < 28:
        return False
    magic = head[:4]
    if magic in (
        b"\xfe\xed\xfa\xce",
        b"\xfe\xed\xfa\xcf",
        b"\xce\xfa\xed\xfe",
        b"\xcf\xfa\xed\xfe",
    ):
        little = magic[0] in (0xCE, 0xCF)
        return _u32(head, 4, little) in _CPU_TYPES and 1 <= _u32(head, 12, little) <= 12
    if magic == b"\xca\xfe\xba\xbe":
        return 1 <= _u32(head, 4, False) <= 16 and _u32(head, 8, False) in _CPU_TYPES
    return False


def _script(head: bytes) -> bool:
    if head[:3] != b"#!/":
        return False
    newline = head.find(b"\n", 3, _SCRIPT_LINE)
    return newline > 3 and not head[3:newline].translate(None, _SCRIPT_BYTES)


def executable_kind(head: bytes) -> str | None:
    """ "PE", "ELF", "Mach-O" or "script" when ``head`` (a value's first bytes) starts an
    executable of that kind, else None."""
    if _pe(head):
        return "PE"
    if _elf(head):
        return "ELF"
    if _macho(head):
        return "Mach-O"
    if _script(head):
        return "script"
    return None
