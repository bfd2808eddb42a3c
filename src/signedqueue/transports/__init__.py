"""
Transports for brokers, for when one machine is not enough.

Each lives in its own module and needs its own extra, so importing
``signedqueue`` never imports a broker client:

``signedqueue.transports.redis`` (extra ``redis``)
    A reliable work queue on a Redis list: at-least-once delivery, per-consumer
    processing lists, a visibility timeout and a dead-letter list, with the
    queue's name bound into every tag.  Also an asyncio variant.

``signedqueue.transports.kombu`` (extras ``kombu`` and ``celery``)
    A kombu serializer, and the Celery hooks that bind the task name and the
    message kind (task or result) into every tag.
"""
