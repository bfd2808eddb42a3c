"""
Transports for brokers, for when one machine is not enough.

Each lives in its own module and needs its own extra, so importing
``signedqueue`` never imports a broker client:

``signedqueue.transports.redis`` (extra ``redis``)
    A reliable work queue on a Redis list: at-least-once delivery, per-consumer
    processing lists, a visibility timeout and a dead-letter list, with the
    queue's name bound into every tag.  Also an asyncio variant.

``signedqueue.transports.kombu`` (extra ``kombu``)
    A kombu serializer with its own content type; the message kind (task or
    other message) and a task's name are bound into every tag.

``signedqueue.transports.celery`` (extra ``celery``)
    ``setup(app, codec)``: the serializer, the app's serializer settings and
    the publish signal and worker bootstep that bind each task's name.
"""
