"""Capture a guest into a template and restore instances (cow | copy | lazy). Not built yet (issue 3).

Uses shmpool and native only; never imports sandbox or daemon.
"""
