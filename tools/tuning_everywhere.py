"""pytest plugin for tools/celery_own_tests.sh: install celery-tuning on every Celery app the tests create."""
import celery
import celery_tuning

_orig = celery.Celery.__init__


def _init(self, *args, **kwargs):
    _orig(self, *args, **kwargs)
    celery_tuning.install(self)


celery.Celery.__init__ = _init
