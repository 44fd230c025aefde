"""Unit tests for addons/oci.py: challenges, API paths, scopes, JSON errors (pure, no network)."""

from __future__ import annotations

import json

import pytest
from mitmproxy.test.tutils import treq

from addons import oci
from addons.oci import ApiPath, Challenge, ProtocolError, parse_api_path

DIGEST = "sha256:" + "a" * 64
OTHER_DIGEST = "sha256:" + "b" * 64


# ---------------------------------------------------------------- parse_www_authenticate


def test_bearer_challenge_with_realm_service_scope():
    [c] = oci.parse_www_authenticate(
        'Bearer realm="https://auth.example.com/token",service="registry.example.com",scope="repository:a/b:pull"'
    )
    assert c.scheme == "bearer"
    assert c.realm == "https://auth.example.com/token"
    assert c.service == "registry.example.com"
    assert c.params["scope"] == "repository:a/b:pull"
    assert c.error is None


def test_scheme_and_param_names_are_case_insensitive():
    [c] = oci.parse_www_authenticate('BEARER Realm="https://r/token", SERVICE="r"')
    assert c.scheme == "bearer"
    assert c.realm == "https://r/token"
    assert c.service == "r"


def test_several_challenges_in_one_header():
    challenges = oci.parse_www_authenticate('Bearer realm="https://r/token",service="r", Basic realm="registry"')
    assert [c.scheme for c in challenges] == ["bearer", "basic"]
    assert challenges[0].params == {"realm": "https://r/token", "service": "r"}
    assert challenges[1].params == {"realm": "registry"}


def test_quoted_values_with_commas_and_escaped_quotes():
    [c] = oci.parse_www_authenticate(
        r'Bearer realm="https://r/token",scope="repository:a/b:pull,push",note="say \"hi\", then go"'
    )
    assert c.params["scope"] == "repository:a/b:pull,push"
    assert c.params["note"] == 'say "hi", then go'
    assert c.realm == "https://r/token"


def test_rfc7235_example_with_two_challenges_and_escaped_quotes():
    challenges = oci.parse_www_authenticate(
        'Newauth realm="apps", type=1, title="Login to \\"apps\\"", Basic realm="simple"'
    )
    assert [c.scheme for c in challenges] == ["newauth", "basic"]
    assert challenges[0].params == {"realm": "apps", "type": "1", "title": 'Login to "apps"'}
    assert challenges[1].realm == "simple"


def test_token68_challenge_does_not_swallow_the_next_one():
    challenges = oci.parse_www_authenticate('Negotiate abc==, Bearer realm="https://r/token"')
    assert [c.scheme for c in challenges] == ["negotiate", "bearer"]
    assert challenges[1].realm == "https://r/token"


def test_whitespace_around_equals_and_commas():
    [c] = oci.parse_www_authenticate('Bearer  realm = "https://r/token" ,  service = "r"')
    assert c.realm == "https://r/token"
    assert c.service == "r"


def test_unquoted_values():
    [c] = oci.parse_www_authenticate("Bearer realm=https://r/token,service=r")
    assert c.realm == "https://r/token"
    assert c.service == "r"


def test_insufficient_scope_error():
    [c] = oci.parse_www_authenticate(
        'Bearer realm="https://r/token",service="r",scope="repository:a/b:pull,push",error="insufficient_scope"'
    )
    assert c.error == "insufficient_scope"
    assert c.params["scope"] == "repository:a/b:pull,push"


def test_basic_challenge():
    [c] = oci.parse_www_authenticate('Basic realm="Registry Realm"')
    assert c.scheme == "basic"
    assert c.realm == "Registry Realm"
    assert c.service is None


def test_bare_basic_without_params():
    [c] = oci.parse_www_authenticate("Basic")
    assert c.scheme == "basic"
    assert c.params == {}


@pytest.mark.parametrize("value", ["", None, "\x00\x01\x02", "=,=,", '"""', ",,,", "=== garbage ===", "\u00e9\u00e8"])
def test_garbage_yields_no_challenges(value):
    assert oci.parse_www_authenticate(value) == []


@pytest.mark.parametrize(
    "value",
    [
        'Bearer realm="unterminated',
        'Bearer realm="https://r/token", \x00 trailing junk',
        "Bearer ,,,, realm",
        'Bearer realm="a"' + ", x" * 5000,
        "a" * 100_000,
    ],
)
def test_broken_input_never_raises_and_gives_a_list_of_challenges(value):
    result = oci.parse_www_authenticate(value)
    assert isinstance(result, list)
    assert all(isinstance(c, Challenge) for c in result)


def test_partial_parse_keeps_what_came_before_the_junk():
    result = oci.parse_www_authenticate('Bearer realm="https://r/token",service="r", \x00\x00 junk')
    assert result and result[0].scheme == "bearer"
    assert result[0].realm == "https://r/token"
    assert result[0].service == "r"


def test_params_before_any_scheme_are_ignored():
    result = oci.parse_www_authenticate('realm="x", Bearer realm="y"')
    assert [c.scheme for c in result] == ["bearer"]
    assert result[0].realm == "y"


# ---------------------------------------------------------------- pick_challenge


def test_pick_prefers_bearer_over_basic_whatever_the_order():
    basic, bearer = Challenge("basic", {"realm": "b"}), Challenge("bearer", {"realm": "t"})
    assert oci.pick_challenge([basic, bearer]) is bearer
    assert oci.pick_challenge([bearer, basic]) is bearer


def test_pick_basic_when_no_bearer():
    basic = Challenge("basic", {"realm": "b"})
    assert oci.pick_challenge([Challenge("negotiate"), basic]) is basic


def test_pick_none_for_unknown_schemes_or_nothing():
    assert oci.pick_challenge([]) is None
    assert oci.pick_challenge([Challenge("negotiate"), Challenge("digest", {"realm": "x"})]) is None


def test_pick_from_parsed_header():
    picked = oci.pick_challenge(oci.parse_www_authenticate('Basic realm="b", Bearer realm="https://r/token",service="r"'))
    assert picked is not None and picked.scheme == "bearer" and picked.realm == "https://r/token"


# ---------------------------------------------------------------- parse_api_path


@pytest.mark.parametrize("path", ["/v2/", "/v2"])
def test_ping(path):
    assert oci.parse_api_path(path) == ApiPath("ping")


def test_catalog():
    assert oci.parse_api_path("/v2/_catalog") == ApiPath("catalog")


def test_manifest_by_tag():
    assert oci.parse_api_path("/v2/library/busybox/manifests/latest") == ApiPath("manifest", "library/busybox", "latest")


def test_manifest_by_digest():
    assert oci.parse_api_path(f"/v2/testing/busybox/manifests/{DIGEST}") == ApiPath("manifest", "testing/busybox", DIGEST)


def test_blob():
    assert oci.parse_api_path(f"/v2/a/b/c/blobs/{DIGEST}") == ApiPath("blob", "a/b/c", DIGEST)


def test_upload_start_without_uuid():
    assert oci.parse_api_path("/v2/a/b/blobs/uploads/") == ApiPath("upload", "a/b", None)


def test_upload_with_uuid():
    uuid = "0f9c1a1e-3b4f-4a2b-9d8e-1234567890ab"
    assert oci.parse_api_path(f"/v2/a/b/blobs/uploads/{uuid}") == ApiPath("upload", "a/b", uuid)


def test_tags_list():
    assert oci.parse_api_path("/v2/a/b/tags/list") == ApiPath("tags", "a/b")


def test_referrers():
    assert oci.parse_api_path(f"/v2/a/b/referrers/{DIGEST}") == ApiPath("referrers", "a/b", DIGEST)


def test_repository_with_blobs_and_manifests_components():
    assert oci.parse_api_path("/v2/a/blobs/b/manifests/v1") == ApiPath("manifest", "a/blobs/b", "v1")
    assert oci.parse_api_path(f"/v2/x/manifests/y/blobs/{DIGEST}") == ApiPath("blob", "x/manifests/y", DIGEST)
    assert oci.parse_api_path("/v2/blobs/uploads/blobs/uploads/") == ApiPath("upload", "blobs/uploads", None)
    assert oci.parse_api_path("/v2/tags/list/tags/list") == ApiPath("tags", "tags/list")


def test_repository_name_separators():
    name = "my-org/sub_dir/image.name/a__b/x---y"
    assert oci.parse_api_path(f"/v2/{name}/manifests/v1").repository == name


def test_repository_name_of_maximum_length_is_valid():
    name = "/".join(["a" * 50] * 4) + "/" + "b" * 51  # 255 characters
    assert len(name) == 255
    assert oci.parse_api_path(f"/v2/{name}/tags/list") == ApiPath("tags", name)


@pytest.mark.parametrize(
    "name",
    [
        "Library/busybox",  # upper case
        "library/BusyBox",
        "a/../b",  # dot-dot component
        "../a",
        "a/./b",
        "a//b",  # empty component
        "/a",
        "a/",
        "a/-b",  # separator at the start of a component
        "a/b-",
        "a b",
        "a" * 256,  # too long
        "/".join(["a" * 50] * 4) + "/" + "b" * 52,  # 256 with components
    ],
)
def test_invalid_repository_names(name):
    with pytest.raises(ProtocolError) as e:
        oci.parse_api_path(f"/v2/{name}/manifests/v1")
    assert e.value.status == 400
    assert e.value.code == "NAME_INVALID"


def test_validate_repository_returns_the_name():
    assert oci.validate_repository("a/b") == "a/b"
    with pytest.raises(ProtocolError) as e:
        oci.validate_repository("A")
    assert (e.value.status, e.value.code) == (400, "NAME_INVALID")


@pytest.mark.parametrize("path", ["/", "/v1/", "/v2x/", "/healthz", "/token", "", "v2/a/manifests/v1"])
def test_non_v2_paths_are_404(path):
    with pytest.raises(ProtocolError) as e:
        oci.parse_api_path(path)
    assert e.value.status == 404


@pytest.mark.parametrize("path", ["/v2/a", "/v2/a/b", "/v2/a/manifests/", "/v2/a/tags/", "/v2/a/unknown/x"])
def test_unknown_v2_endpoints_are_404(path):
    with pytest.raises(ProtocolError) as e:
        oci.parse_api_path(path)
    assert e.value.status == 404


@pytest.mark.parametrize(
    "reference",
    [
        ".hidden",  # a tag cannot start with '.'
        "-dash",  # nor with '-'
        "a" * 129,  # tags are at most 128 characters
        "t\u00e4g",  # tags are ASCII: [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}
        "\u0661\u0662",  # Arabic-Indic digits are not [0-9]
    ],
)
def test_invalid_tags_are_400(reference):
    with pytest.raises(ProtocolError) as e:
        oci.parse_api_path(f"/v2/a/manifests/{reference}")
    assert e.value.status == 400


def test_tag_of_maximum_length_is_valid():
    tag = "A" + "b" * 127
    assert oci.parse_api_path(f"/v2/a/manifests/{tag}").reference == tag


@pytest.mark.parametrize("digest", ["latest", "sha256:short", "SHA256:" + "a" * 64])
def test_invalid_blob_digest_is_400(digest):
    with pytest.raises(ProtocolError) as e:
        oci.parse_api_path(f"/v2/a/blobs/{digest}")
    assert e.value.status == 400


def test_protocol_error_is_a_value_error_with_message():
    err = ProtocolError(400, "NAME_INVALID", "bad name")
    assert isinstance(err, ValueError)
    assert str(err) == "bad name"


# ---------------------------------------------------------------- required_scopes


@pytest.mark.parametrize("method", ["GET", "HEAD", "get", "head"])
def test_read_methods_need_pull(method):
    api = oci.parse_api_path("/v2/a/b/manifests/v1")
    assert oci.required_scopes(method, api) == ("repository:a/b:pull",)


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH"])
def test_write_methods_need_pull_and_push(method):
    api = oci.parse_api_path("/v2/a/b/blobs/uploads/")
    assert oci.required_scopes(method, api) == ("repository:a/b:pull,push",)


def test_put_manifest_needs_pull_and_push():
    assert oci.required_scopes("PUT", oci.parse_api_path("/v2/a/manifests/v1")) == ("repository:a:pull,push",)


def test_delete_needs_delete():
    api = oci.parse_api_path(f"/v2/a/b/manifests/{DIGEST}")
    assert oci.required_scopes("DELETE", api) == ("repository:a/b:delete",)


def test_cross_repository_mount_adds_pull_on_the_source():
    api = oci.parse_api_path("/v2/dst/repo/blobs/uploads/")
    scopes = oci.required_scopes("POST", api, f"mount={DIGEST}&from=src/repo")
    assert scopes == ("repository:dst/repo:pull,push", "repository:src/repo:pull")


def test_mount_scopes_are_sorted():
    api = oci.parse_api_path("/v2/zzz/blobs/uploads/")
    scopes = oci.required_scopes("POST", api, f"from=aaa&mount={DIGEST}")
    assert scopes == ("repository:aaa:pull", "repository:zzz:pull,push")
    assert list(scopes) == sorted(scopes)


def test_mount_with_url_encoded_source():
    api = oci.parse_api_path("/v2/dst/blobs/uploads/")
    assert "repository:src/repo:pull" in oci.required_scopes("POST", api, f"mount={DIGEST}&from=src%2Frepo")


def test_mount_from_the_same_repository_adds_nothing():
    api = oci.parse_api_path("/v2/a/blobs/uploads/")
    assert oci.required_scopes("POST", api, f"mount={DIGEST}&from=a") == ("repository:a:pull,push",)


def test_from_without_mount_adds_nothing():
    api = oci.parse_api_path("/v2/a/blobs/uploads/")
    assert oci.required_scopes("POST", api, "from=other") == ("repository:a:pull,push",)


def test_mount_from_invalid_name_adds_nothing_and_does_not_raise():
    api = oci.parse_api_path("/v2/a/blobs/uploads/")
    assert oci.required_scopes("POST", api, f"mount={DIGEST}&from=../Etc") == ("repository:a:pull,push",)


def test_mount_query_ignored_outside_upload_post():
    api = oci.parse_api_path(f"/v2/a/blobs/{DIGEST}")
    assert oci.required_scopes("GET", api, f"mount={OTHER_DIGEST}&from=b") == ("repository:a:pull",)


def test_catalog_scope():
    assert oci.required_scopes("GET", oci.parse_api_path("/v2/_catalog")) == ("registry:catalog:*",)


def test_ping_needs_no_scope():
    assert oci.required_scopes("GET", oci.parse_api_path("/v2/")) == ()


def test_scopes_for_every_endpoint_kind():
    for path in ("/v2/r/tags/list", f"/v2/r/referrers/{DIGEST}", f"/v2/r/blobs/{DIGEST}", "/v2/r/blobs/uploads/u1"):
        assert oci.required_scopes("GET", oci.parse_api_path(path)) == ("repository:r:pull",)


# ---------------------------------------------------------------- errors


GET = treq(method=b"GET")  # the request a refusal answers


def test_error_response_shape():
    resp = oci.refusal(GET, 404, "NAME_UNKNOWN", "connector default/x not found")
    assert resp.status_code == 404
    assert resp.headers["Content-Type"] == "application/json"
    assert resp.headers["Docker-Distribution-API-Version"] == "registry/2.0"
    assert json.loads(resp.content) == {"errors": [{"code": "NAME_UNKNOWN", "message": "connector default/x not found"}]}


def test_error_response_with_detail_and_extra_headers():
    resp = oci.refusal(
        GET, 401, "UNAUTHORIZED", "authentication required", detail={"why": "no token"},
        headers={"WWW-Authenticate": 'Basic realm="p"'},
    )
    assert resp.status_code == 401
    assert resp.headers["WWW-Authenticate"] == 'Basic realm="p"'
    assert resp.headers["Content-Type"] == "application/json"
    body = json.loads(resp.content)
    assert body == {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required", "detail": {"why": "no token"}}]}


def test_error_response_content_length_matches():
    resp = oci.refusal(GET, 503, "UNAVAILABLE", "x" * 1000)
    assert int(resp.headers["content-length"]) == len(resp.content)


def test_error_body_is_json_even_with_quotes_and_unicode():
    body = oci.error_body("DENIED", 'say "no" \u2014 \u62d2\u7edd')
    assert json.loads(body)["errors"][0]["message"] == 'say "no" \u2014 \u62d2\u7edd'


def test_ping_response():
    resp = oci.ping_response()
    assert resp.status_code == 200
    assert json.loads(resp.content) == {}
    assert resp.headers["Docker-Distribution-API-Version"] == "registry/2.0"


def test_digests_have_a_length_cap():
    """A 70,000-character reference used to reach the registry (which answers 500)."""
    huge = "sha256:" + "a" * 70_000
    for path in (f"/v2/a/blobs/{huge}", f"/v2/a/manifests/{huge}"):
        with pytest.raises(ProtocolError):
            parse_api_path(path)
    assert parse_api_path("/v2/a/blobs/sha256:" + "a" * 64).reference == "sha256:" + "a" * 64
