// An example TypeScript caller of the Payments REST API and a contract test: the types come from
// openapi/payments.openapi.json (openapi-typescript, `npm run gen`), the calls go through
// openapi-fetch, so `tsc` refuses this file when the document stops describing what it does. One
// scenario: register, log in, create a payment, get it, list it, confirm it as an admin, and a
// typed error (an amount of 0: 400, INVALID_ARGUMENT, ErrorInfo reason INVALID_PAYMENT). Each step
// prints one JSON line; any surprise exits 1.
//
//   npm run build && PAYMENTS_ADMIN_PASSWORD=... node dist/scenario.js http://127.0.0.1:8080 admin@example.com
import createClient from "openapi-fetch";
import type { components, paths } from "../gen/schema.js";

type Status = components["schemas"]["Status"];
type Payment = components["schemas"]["Payment"];
/** The google.rpc.ErrorInfo detail every error carries (docs/api.md#errors): one of Status.details,
 * whose type the document leaves open (an Any: "@type" and any other fields). */
type ErrorInfo = components["schemas"]["Any"] & {
  "@type": "type.googleapis.com/google.rpc.ErrorInfo";
  reason: string;
  domain: string;
};

const PASSWORD = "correct horse battery";

function step(name: string, fields: Record<string, unknown>): void {
  console.log(JSON.stringify({ step: name, ...fields }));
}

function fail(what: string, detail: unknown): never {
  throw new Error(`${what}: ${JSON.stringify(detail)}`);
}

function errorInfo(status: Status): ErrorInfo | undefined {
  return status.details?.find((d): d is ErrorInfo =>
    d["@type"] === "type.googleapis.com/google.rpc.ErrorInfo" && typeof d.reason === "string");
}

async function main(baseUrl: string, adminEmail: string, adminPassword: string): Promise<void> {
  const api = createClient<paths>({ baseUrl });
  const auth = (token: string) => ({ headers: { Authorization: `Bearer ${token}` } });

  const email = `ts-buyer-${Date.now()}@example.com`;
  const registered = await api.POST("/v1/auth/register", { body: { email, password: PASSWORD } });
  if (!registered.data) fail("register", registered.error);
  step("register", { email, user_id: registered.data.user_id, role: registered.data.role });

  const login = await api.POST("/v1/auth/login", { body: { email, password: PASSWORD } });
  if (!login.data?.access_token) fail("login", login.error);
  const token = login.data.access_token;
  step("login", { token_type: login.data.token_type, expires_in: login.data.expires_in });

  // int64 is a JSON string: the document says so, and the generated type makes it one.
  const order: Payment = { email, amount: "150000", currency: "IDR", description: "TypeScript client" };
  const created = await api.POST("/v1/payments", { body: order, ...auth(token) });
  if (!created.data?.id) fail("create", created.error);
  const id = created.data.id;
  step("create", { id, status: created.data.status, amount: created.data.amount });

  const got = await api.GET("/v1/payments/{id}", { params: { path: { id } }, ...auth(token) });
  if (!got.data) fail("get", got.error);
  step("get", { id: got.data.id, status: got.data.status, description: got.data.description });

  const page = await api.GET("/v1/payments", { params: { query: { page_size: 10, status: "PENDING" } }, ...auth(token) });
  if (!page.data) fail("list", page.error);
  const ids = (page.data.payments ?? []).map((p) => p.id);
  if (!ids.includes(id)) fail("list", { missing: id, ids });
  step("list", { ids });

  const admin = await api.POST("/v1/auth/login", { body: { email: adminEmail, password: adminPassword } });
  if (!admin.data?.access_token) fail("admin login", admin.error);
  const confirmed = await api.POST("/v1/payments/{id}:confirm", {
    params: { path: { id } }, body: {}, ...auth(admin.data.access_token),
  });
  if (!confirmed.data) fail("confirm", confirmed.error);
  step("confirm", { id: confirmed.data.id, status: confirmed.data.status });

  // A typed error: the body is a google.rpc.Status whatever the HTTP status; the reason is stable.
  const refused = await api.POST("/v1/payments", { body: { email, amount: "0" }, ...auth(token) });
  if (!refused.error) fail("an amount of 0 was accepted", refused.data);
  const info = errorInfo(refused.error);
  if (!info) fail("no ErrorInfo detail", refused.error);
  step("error", { http_status: refused.response.status, code: refused.error.code, reason: info.reason,
                  domain: info.domain, message: refused.error.message });
}

const [baseUrl = "http://127.0.0.1:8080", adminEmail = ""] = process.argv.slice(2);
const adminPassword = process.env.PAYMENTS_ADMIN_PASSWORD ?? "";
if (!adminEmail || !adminPassword) {
  console.error("usage: PAYMENTS_ADMIN_PASSWORD=... node dist/scenario.js BASE_URL ADMIN_EMAIL");
  process.exit(2);
}
main(baseUrl, adminEmail, adminPassword).catch((err: unknown) => {
  console.error("payments-typescript-client:", err instanceof Error ? err.message : err);
  process.exit(1);
});
