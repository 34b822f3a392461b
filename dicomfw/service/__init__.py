"""The process and its lifecycle: the daemon loop, worker processes, systemd, the heap.

``supervisor`` forks workers that each run ``daemon``; ``sdnotify`` talks to systemd and
``heap`` keeps glibc's heap small. See docs/architecture.md.
"""
