"""The runtime configuration: every variable parsed in one place, refused by name when it does not parse."""

from pathlib import Path

import pytest

from ops.runtime.config import ENVIRONMENT, Config, ConfigError, describe


def test_defaults_without_any_variable():
    config = Config.from_env(env={})
    assert config == Config()
    assert config.vector_store == "edge" and config.encoder == "onnx-int8" and config.clarify
    assert config.image_policy.file_roots == () and not config.image_policy.allow_hosts


def test_image_policy_from_the_environment(tmp_path):
    policy = Config.from_env(env={"TESSERA_IMAGE_ROOTS": f"{tmp_path}:/srv/media", "TESSERA_IMAGE_MAX_BYTES": "1000",
                                  "TESSERA_IMAGE_ALLOW_HOSTS": "Media.internal, 10.0.0.5",
                                  "TESSERA_S3_ENDPOINT": "http://minio:9000"}).image_policy
    assert policy.file_roots == (tmp_path.resolve(), Path("/srv/media"))
    assert policy.allow_hosts == {"media.internal", "10.0.0.5"} and policy.max_bytes == 1000
    assert policy.s3_endpoint == "http://minio:9000"


@pytest.mark.parametrize("name, value, says", [
    ("TESSERA_EMBED_BATCH", "lots", "is not an integer"),
    ("TESSERA_VISIBILITY_TIMEOUT", "0", "below the least allowed value"),
    ("TESSERA_HEALTH_STALL_S", "soon", "is not a number"),
    ("TESSERA_VECTOR_STORE", "faiss", "is not one of edge, sqlite, qdrant"),
    ("TESSERA_ENCODER", "tensorrt", "is not one of"),
    ("TESSERA_CLARIFY", "yes", "is not one of 0, 1"),
])
def test_a_value_that_does_not_parse_is_refused_by_name(name, value, says):
    with pytest.raises(ConfigError, match=f"^{name}: .*{says}"):
        Config.from_env(env={name: value})


def test_a_qdrant_url_alone_selects_the_qdrant_store():
    assert Config.from_env(env={"TESSERA_QDRANT_URL": "http://q:6333"}).vector_store == "qdrant"
    assert Config.from_env(env={"TESSERA_QDRANT_URL": "http://q:6333", "TESSERA_VECTOR_STORE": "sqlite"}).vector_store \
        == "sqlite"


def test_the_listing_names_every_variable_and_hides_secrets():
    rows = describe({"TESSERA_ES_API_KEY": "s3cret", "TESSERA_EMBED_BATCH": "32",
                     "TESSERA_STATE_URL": "postgresql://u:pw@h/db"})
    by_name = {name: value for name, value, _ in rows}
    assert set(by_name) == set(ENVIRONMENT)
    assert by_name["TESSERA_EMBED_BATCH"] == "32" and by_name["TESSERA_VECTOR_STORE"] == "(default)"
    assert by_name["TESSERA_ES_API_KEY"] == "(set)" and "pw" not in by_name["TESSERA_STATE_URL"]
    assert all(meaning for _, _, meaning in rows)
