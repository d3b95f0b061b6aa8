"""The errors of a download, each one line naming the file or URL: :class:`DownloadError`
and its kinds (host unreachable, integrity, unsafe archive)."""

from __future__ import annotations


class DownloadError(OSError):
    """A download that cannot be completed; ``str()`` is one line naming the file or URL."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "download failed"


class HostUnreachableError(DownloadError):
    """The host of a URL could not be reached (refused, unknown name, timeout)."""


class IntegrityError(DownloadError):
    """A downloaded file has the wrong size or checksum, or is not what it should be."""


class UnsafeArchiveError(DownloadError):
    """An archive member would escape the target folder or is a device, FIFO or odd link."""
