"""An expert others depend on cannot be deleted: a remote expert's fallback and a black-box ensemble's
member get a 409 naming every dependant (as a LoRA's base and a forest's member do), and the delete
goes through once the references are gone."""

from __future__ import annotations


def test_fallbacks_and_members_cannot_be_deleted_from_under_their_users(gateway, tiny_model_dir):
    with gateway.admin() as c:
        gateway.register("dep-local", tiny_model_dir)
        r = c.post("/admin/experts/remote", json={"id": "dep-remote", "base_url": gateway.base + "/v1",
                                                  "model": "tiny", "check": False, "fallbacks": ["dep-local"]})
        assert r.status_code == 201, r.text
        r = c.post("/admin/ensembles", json={"id": "dep-bb", "mode": "score_select",
                                             "members": ["dep-local", "tiny"]})
        assert r.status_code == 201, r.text

        r = c.delete("/admin/experts/dep-local")
        assert r.status_code == 409, r.text
        err = r.json()["error"]
        assert err["type"] == "conflict_error" and err["code"] == "expertinuse"
        assert "'dep-remote' (remote expert, as a fallback)" in err["message"]
        assert "'dep-bb' (blackbox expert, as a member)" in err["message"]
        assert c.get("/admin/experts/dep-local").status_code == 200  # still there, files and all

        assert c.delete("/admin/experts/tiny").status_code == 409  # a member too
        assert c.delete("/admin/experts/dep-bb").status_code == 200
        r = c.delete("/admin/experts/dep-local")
        assert r.status_code == 409 and "dep-bb" not in r.json()["error"]["message"]

        r = c.patch("/admin/experts/dep-remote", json={"fallbacks": []})
        assert r.status_code == 200, r.text
        assert c.delete("/admin/experts/dep-local").status_code == 200
        assert c.delete("/admin/experts/dep-remote").status_code == 200
