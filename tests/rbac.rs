//! The example RBAC roles (`examples/rbac/`) against the real API server, which runs with
//! `--authorization-mode RBAC`: they are valid, and, impersonating a bound user, a requester may
//! create and delete grants but neither write a JitPolicy nor touch a grant's status, and a
//! policy admin may write policies but not grant status.

mod support;

use std::process::Output;

use support::kube::{client, fresh_namespace, install_crds};

use support::{kubectl, output_text as text};

fn assert_ok(what: &str, out: &Output) {
    assert!(out.status.success(), "{what} failed: {}", text(out));
}

fn assert_forbidden(what: &str, out: &Output) {
    assert!(!out.status.success(), "{what} was allowed: {}", text(out));
    assert!(
        text(out).contains("forbidden"),
        "{what} failed, but not for RBAC: {}",
        text(out)
    );
}

fn example(name: &str) -> String {
    support::repo_root()
        .join("examples/rbac")
        .join(name)
        .display()
        .to_string()
}

const POLICY: &str = r#"
apiVersion: portcullis.dev/v1alpha1
kind: JitPolicy
metadata: { name: prod }
spec:
  virtualMachines:
    - id: /subscriptions/00000000-0000-0000-0000-000000000001/resourceGroups/rg-demo/providers/Microsoft.Compute/virtualMachines/vm1
      ports:
        - { number: 22, protocol: TCP, allowedSourceAddressPrefixes: ["203.0.113.0/24"], maxRequestAccessDuration: PT1H }
"#;

const GRANT: &str = r#"
apiVersion: portcullis.dev/v1alpha1
kind: AccessGrant
metadata: { name: alice-ssh }
spec:
  policyRef: { name: prod }
  virtualMachine: vm1
  ports: [22]
  sourceAddressPrefix: 203.0.113.7/32
  duration: PT1H
  justification: "INC-1: RBAC test"
"#;

#[tokio::test]
async fn example_roles_are_valid_and_give_requesters_grants_but_not_policies_or_status() {
    let client = client().await;
    install_crds(&client).await;
    let ns = fresh_namespace(&client, "rbac").await;

    // Valid: the server accepts both files (dry run first, as for every example).
    for file in ["requester.yaml", "policy-admin.yaml", "approver.yaml"] {
        let out = kubectl(
            &["apply", "--dry-run=server", "-n", &ns, "-f", &example(file)],
            None,
        );
        assert_ok(&format!("dry-run of {file}"), &out);
        assert!(text(&out).contains("(server dry run)"));
    }
    // Then for real; the RoleBindings bind the example groups in this namespace only.
    for file in ["requester.yaml", "policy-admin.yaml", "approver.yaml"] {
        assert_ok(
            &format!("apply of {file}"),
            &kubectl(
                &[
                    "apply",
                    "--server-side",
                    "--force-conflicts",
                    "-n",
                    &ns,
                    "-f",
                    &example(file),
                ],
                None,
            ),
        );
    }
    let requester = ["--as", "alice", "--as-group", "team-a-oncall", "-n", &ns];
    let admin = ["--as", "bob", "--as-group", "team-a-security", "-n", &ns];
    let with = |who: &[&str], args: &[&str]| -> Vec<String> {
        who.iter().chain(args).map(|s| s.to_string()).collect()
    };
    let run = |args: Vec<String>, stdin: Option<&str>| {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        kubectl(&refs, stdin)
    };

    // A requester cannot write the policy; the policy admin can.
    assert_forbidden(
        "requester creating a JitPolicy",
        &run(with(&requester, &["create", "-f", "-"]), Some(POLICY)),
    );
    assert_ok(
        "policy admin creating a JitPolicy",
        &run(with(&admin, &["create", "-f", "-"]), Some(POLICY)),
    );
    assert_forbidden(
        "requester editing a JitPolicy",
        &run(
            with(
                &requester,
                &[
                    "patch",
                    "jitpolicy",
                    "prod",
                    "--type=merge",
                    "-p",
                    r#"{"spec":{"virtualMachines":[]}}"#,
                ],
            ),
            None,
        ),
    );
    assert_forbidden(
        "requester deleting a JitPolicy",
        &run(with(&requester, &["delete", "jitpolicy", "prod"]), None),
    );
    assert_ok(
        "requester reading policies",
        &run(with(&requester, &["get", "jitpolicies"]), None),
    );

    // A requester creates a grant, but can neither edit it nor write its status.
    assert_ok(
        "requester creating an AccessGrant",
        &run(with(&requester, &["create", "-f", "-"]), Some(GRANT)),
    );
    let forged = r#"{"status":{"phase":"Active","expiresAt":"2099-01-01T00:00:00Z"}}"#;
    for who in [&requester, &admin] {
        assert_forbidden(
            "writing a grant's status",
            &run(
                with(
                    who,
                    &[
                        "patch",
                        "accessgrant",
                        "alice-ssh",
                        "--subresource=status",
                        "--type=merge",
                        "-p",
                        forged,
                    ],
                ),
                None,
            ),
        );
        // No update/patch: nobody but the operator edits a grant (or strips its finalizer).
        assert_forbidden(
            "editing a grant",
            &run(
                with(
                    who,
                    &[
                        "patch",
                        "accessgrant",
                        "alice-ssh",
                        "--type=merge",
                        "-p",
                        r#"{"metadata":{"finalizers":null},"spec":{"ports":[22,3389]}}"#,
                    ],
                ),
                None,
            ),
        );
    }
    assert_forbidden(
        "policy admin writing a policy's status",
        &run(
            with(
                &admin,
                &[
                    "patch",
                    "jitpolicy",
                    "prod",
                    "--subresource=status",
                    "--type=merge",
                    "-p",
                    r#"{"status":{"observedGeneration":99}}"#,
                ],
            ),
            None,
        ),
    );
    // Withdrawing a grant is allowed (it only closes access early).
    assert_ok(
        "requester deleting an AccessGrant",
        &run(
            with(
                &requester,
                &["delete", "accessgrant", "alice-ssh", "--wait=false"],
            ),
            None,
        ),
    );
    // Bindings are per namespace: nothing in another one.
    assert_forbidden(
        "requester in a namespace it is not bound in",
        &run(
            vec![
                "--as".into(),
                "alice".into(),
                "--as-group".into(),
                "team-a-oncall".into(),
                "-n".into(),
                "default".into(),
                "create".into(),
                "-f".into(),
                "-".into(),
            ],
            Some(GRANT),
        ),
    );
}
