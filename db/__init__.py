"""Atelier's database layer: SQLAlchemy 2 async on SQLite (default, WAL) or PostgreSQL.

This package never imports ``bot``, ``engine`` or ``config``: it takes plain values (URLs,
numbers) so it can be used and tested on its own. Entry points:

* ``db.session.Database``: engine + transactional sessions;
* ``db.migrate.upgrade(url)``: create/upgrade the schema (safe at every start);
* ``db.quotas.QuotaStore``, ``db.jobs.JobStore``, ``db.moderation.ModerationStore``: the stores;
* ``db.ids.new_job_id``: short job ids.
"""
