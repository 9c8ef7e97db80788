"""A stand-in for pykms (python3-kms++, Raspberry Pi archive only): picamera2 imports it for its DRM preview,
which the check never opens. Every name is a class whose every attribute is that class again."""


class _Anything(type):
    def __getattr__(cls, name: str) -> type:
        return cls


def __getattr__(name: str) -> type:
    return _Anything(name, (), {})
