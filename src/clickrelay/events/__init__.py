"""Events out: what happened (a click, a bot click, a tracked send), delivered to webhooks and
served as a feed. Storage keeps them (the outbox); this package signs and delivers them."""
