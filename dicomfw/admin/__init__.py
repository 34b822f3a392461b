"""What an admin uses to write, review and switch on rules: ``dicomfw explain``, ``learn``,
``schema`` and the warnings and ``--diff`` of ``dicomfw check``.

Everything here reads a loaded ``Config`` and asks the core's ``Policy`` the same questions the
daemon asks it: no second implementation of a rule, so what these tools say is what the
firewall does.
"""
